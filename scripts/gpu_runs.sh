#!/usr/bin/env bash
# The GPU runs that the open issues' goals need, split so each stage fits one 10-minute device call.
# Run from the repository root on the GPU machine:  bash scripts/gpu_runs.sh STAGE
#   suite   the whole GPU test suite
#   final / final2  the GPU suite in two halves, one call each (the whole took ~540 s on an H100, thirty-second session)
#   dense   dense19 + prefill + rollouts:
#     dense19   issue 19's before/after: throughput19 (throughput) and sync19 (weight sync; sync19-before / -after split it)
#     prefill   the prefill call's host time before/after
#     rollouts  issue 24's sampler + offline rollouts (0.6B, 8B)
#   http    issue 24's HTTP and streaming rollouts (needs FastAPI/uvicorn/pydantic/orjson wheels in .whl/)
#   http-workers  the streaming rollout with one and with two front end processes (~250 s)
#   moe-kernels  issue 20's MoE layer kernels before/after and their tile sweep, batch-1 throughput before
#   moe-pair   issue 20's layer kernels before/after, no sweep (fits an H100)
#   rollout-repeats  issue 24's 0.6B rollout run three times per mode (one-time costs, the spread)
#   moe-quick  issue 20's layer kernels (no sweep) and the 30B-A3B throughput, for a short session
#   moe     issue 20's Qwen3-30B-A3B throughput, then moe-rollout: its rollout with and without routed experts (R3)
#   moe-r3  the R3 cost on an 80 GB card: the 30B-A3B rollout at 96 sequences (no preemption), with and without R3
#   epilogues  the few-rows matmul's epilogues (SiLU-and-mul, q/k/v heads) and decode attention's preload: GPU tests, decode
#              with each off and all on, the decode graphs' critical path (~400 s)
#   kv-loads  decode attention's KV loads evict-first against .before (d7097ab): 0.6B batch 1 / 64 twice,
#             with the hint off, the sampled rollout (~280 s)
#   knobs   the few-rows matmul's steps in flight by rows against 5 / 3 for all rows, in whole decode, and its GPU tests (~250 s)
#   rows    the few-rows decode matmul (kernels/rows_matmul.py): GPU tests, against cuBLAS with a tile sweep, decode on / off
#   profile  the decode graphs' kernels by device time: 0.6B batch 1 / 64, 30B-A3B batch 1 (~200 s)
#   merge-small  the split merge's 8-row tile and the idle splits' trim, apart (. = 8fa57ae, .small = fcacd67, .before = c250578; ~415 s, fortieth session)
#   l2-small  the small batches' L2 prefetch of the MLP weights on / off: GPU tests, batch 1 / 4 / 16, profiles, rollout (~370 s)
#   merge-h200  decode attention's tile merge against the loop over splits (.before = 0fdb108): its GPU tests, one before /
#               after round, then (H200) the offline rollouts, else a second round (~560 s)
#   h200-goals  issue 24's goals on an H200 (~430 s, `needs_h200`): 0.6B batch 1 / 64, 0.6B / 8B rollouts, 0.6B streaming
#   h200-check  the GPU tests of the twenty-ninth session's checkpoint variants and the engine, then h200's rollouts (~530 s)
#   h100-check  h200-check for an 80 GB card, with the 0.6B batch 1 / 64 and the 30B-A3B batch 1 (~500 s)
#   h200    one H200 call (~480 s, `needs_h200`: the 30B-A3B rollout of 256 sequences needs its memory): that rollout with and
#           without R3, the 30B-A3B batch 1, the 0.6B / 8B rollouts, the 0.6B batch 1 / 64
#   sessions  a weight-update session's cost with its saved originals in the lent KV pool and without (8B, 30B-A3B)
#   attention-mix  decode attention on a rollout's mixed contexts (program order, tiles, KV splits for mid-size batches)
#   batch1   batch-1 throughput of the 0.6B and the 30B-A3B (the qkv matmul finishing its heads; ~180 s)
#   fusions  the eighteenth session's kernel changes: their GPU tests, the MoE layer, 30B-A3B batch 1 before (.moe-before)
#            and after, the 0.6B batch 1 / 64 with the in-place split merge and with the merge kernel (~450 s on an H100)
#   pusher   IPCWeightPusher's calls_in_flight 1 against 2 on the 61 GB push, through a queue and over HTTP (sessions off)
#   host-ab  the host step's per-row work since the thirty-first session's start, on the graph path: 0.6B batch 64 throughput
#            and host step, before / after twice (~240 s; before: git archive be24495 src bench | (mkdir -p .hs-before && tar -x -C .hs-before))
#   copies-quick  pusher-sizes for a short budget: the GPU tests and the pusher after only (~200 s)
#   pusher-sizes  replies after the copies: the tensor paths' GPU tests, the pusher before / after in 512 MiB buckets, after in 2 GiB (~330 s)
#   pusher-sessions  the pusher's default path (sessions) on the 8B, its buckets unpacked (`--sources aliased`) so only the
#             engine's saves and copies move bytes, replies after the copies against synchronised, and without sessions (~150 s)
#   moe-sync  issue 20's 61 GB update, in process and over the trainer library's CUDA IPC pusher (fits an H100:
#             beside the engine's 61 GB the bench's sources are views of one buffer, `--sources auto`; ~230 s on an H200)
# Device seconds measured: suite 280 (H200) / 308-380 (H100), run alone (~540 on an H100 in the thirty-second session, 262 tests); throughput19 ~130; sync19 up to 560 (the
# 8B IPC section alone needs more than the 150 s it had); moe-pair ~60; rollout-repeats ~120; moe-kernels ~280;
# http ~270 if streaming keeps up (its limits allow 950); moe ~300; moe-sync up to 570.
# What the open issues still lack, in order (the twenty-second to twenty-fifth sessions ran on H100s; their H200 tries
# did not start): `h200` (H200 figures predate longest-first attention, the mid-size split plan, the fusions, the
# few-rows matmul and its epilogues, the evict-first KV loads: 0.6B / 8B rollouts 54.6 / 71.1 %, the 30B-A3B batch 1
# 46.5 %, R3 +5.3 % at 256 sequences; the H100 now has 77 / 81 %, 60.3 %, R3 +2.3 % at 96 sequences), then moe-sync
# with --ipc-bucket-mib 512,2048, `sessions` with a serving-size KV pool, `attention-mix` (the plan against one split).
# (The few-rows tiles' sweep with unsplit K and 128-column tiles ran in the twenty-fifth session: the heuristic's tiles
# are its best; the twenty-sixth's `knobs` stage chose their steps in flight by rows, batch 64 47.1-47.4 -> 47.6-48.1 %.
# Its five H200 tries did not start either. The twenty-seventh ran `suite` on 0ed2f45 (248 passed) and the GPU tests of
# what changed after it; its four H200 tries did not start: `h200` is still what the issues lack, then `suite` on the
# tree of the day.)
# (The twenty-ninth ran `suite` on 5fc05a0 (248 passed) and the 512-row host step; its later H200 and H100 tries did not
# start: `h200-check` is what the issues lack, with the GPU tests of that session's checkpoint variants, not yet run.)
# (The thirtieth and thirty-first sessions started no machine in 38 tries: still `h200-check` (`needs_h200`), then `final`
# on the tree of the day, then a `bench/host_step.py --device cuda` A/B of the thirty-first's per-row host work.)
# (The thirty-second ran the GPU suite on 192e808 on an H100, split in two calls: 255 passed, 7 skipped, none failed; its other
# tries did not start. Next: `h200-check` (`needs_h200`) or `h100-check`, then `host-ab` (the kept decode batch and the
# per-row host work on the graph path), `pusher` (calls_in_flight 1 against 2), `moe-sync`.)
# (The thirty-third ran `h100-check`, `host-ab`, `pusher` and a batch-64 profile on an H100; its later tries did not start. Next,
# first: `copies-quick` (the GPU tests of replies after the copies, scheduler/copy_replies.py, never run on a GPU, and the 61 GB
# push with it), then `final` / `final2` on the tree of the day, then `h200-check` (`needs_h200`).)
# (The thirty-fourth ran `copies-quick`, `final`, `final2`, `moe-sync`, the pusher over HTTP, issue 24's HTTP rollout with two
# front ends and the 8B pusher with sessions `--pusher-replies after-copies,synchronised` on an H100; two H200 tries did not
# start. Next: `h200` or `h200-check` (`needs_h200`: no H200 figure since the seventeenth session), then `pusher-sessions`
# (the pusher's default path with its buckets unpacked, to separate the trainer's packing from the engine's saves).)
# (The thirty-fifth ran an L2-prefetch probe (dropped), `sum-in-norm` (kept: batch 64 48.4-49.0 %) and the norm's warps on an
# H100; six tries did not start. Next: `norm-ab` (the norm's weight before the PDL wait, built after the budget was spent),
# then `final` / `final2` on the tree of the day (the suite last ran on 273d181; only the
# few-rows kernels' GPU tests ran on this session's tree), then `h200-check` (`needs_h200`), `pusher-sessions`. Batch 64
# still wants ~1 point: the norm that sums the partials costs 2.29 us a call against 1.62 before, decode attention 522 us
# a step against ~353 of KV.)
# (The thirty-sixth ran `norm-ab` (kept: batch 64 49.5 / 50.4 %) and decode attention knobs (none kept) on an H100; its
# eleven later tries (H100 and H200 kinds) started no machine. Next, first: `heads-pages` (ROUNDS=2; the q/k/v heads
# epilogues' staged inputs before the PDL wait, and HOTSWAP_DECODE_PAGES_AHEAD=1, off until it measures a gain: flip its
# default or drop it), then `suite` on the tree of the day (last whole on 273d181), then `h200-check` (`needs_h200`).)
# (The thirty-seventh ran `heads-pages` (since removed: the q/k/v heads epilogue's inputs before the wait and the host trims
# kept, batch 64 50.0 / 50.1 %; attention's pages a block ahead dropped) and `suite` (263 passed) on an H100; its later
# tries (H100 and H200 kinds) mostly started no machine. Next: `rows-split` (the few-rows matmuls' K splits in whole
# decode: keep a knob's setting as the default if it wins, else remove the knobs), then `h200-check` (`needs_h200`).)
# (The thirty-eighth ran `rows-split` on an H100 (since removed: no K split kept, nor small batches' 32-key attention
# splits); its other tries (H100 and H200 kinds, 18:05-19:35 UTC) started no machine. It then changed decode attention's
# split merge (one tile of partials a head instead of a loop over them), checked in the interpreter and compiled for
# sm_90 only. Next, first: `merge-tile` (its GPU tests and the before / after figures; run as `merge-h200`), then
# `h200-goals` (`needs_h200`, carry .whl: issue 24's goals on the card its table names), then `suite` on the tree of the day.)
# (The thirty-ninth ran `merge-h200` on an H100 after nine tries that started none (its tests ran out of 150 s compiling;
# they passed in a second call, 105, with the engine's and the checkpoint variants' GPU tests, 16 + 4) and the sampled
# 0.6B rollout before / after; the tile merge is kept (batch 1 at 2,048 + 512 tokens +22 %, at 128 + 128 -2 %). It then
# gave short contexts an 8-row tile and stopped the splits that whole key blocks leave without keys, compiled for sm_90
# and checked in the interpreter only. Next, first: `merge-small`, then `h200-goals` (`needs_h200`, carry .whl), then
# `suite` on the tree of the day.)
# "Before" is the tree before the restructure, unpacked beside this one (untracked, so it travels to the
# device):  git archive 6c9ff7c src bench | (mkdir -p .before && tar -x -C .before)
# The MoE stage compares its decode kernels with the tree before they changed, unpacked the same way:
#   git archive d115b5c src bench | (mkdir -p .moe-before && tar -x -C .moe-before)
# (for the fusions stage, the tree before the eighteenth session's fusions: git archive 546a591 instead of d115b5c)
# Logs go to $OUT when set (the device tool returns that folder), else bench/results/gpu_runs/.
set -uo pipefail
cd "$(dirname "$0")/.."
stages="suite|final|final2|dense|dense19|throughput19|sync19[-before|-after]|prefill|rollouts|rollout-repeats|http|http-workers|sessions|fusions|batch1|attention-mix|moe-kernels|moe-pair|moe-quick|moe|moe-r3|moe-rollout|moe-sync|host-ab|pusher|pusher-sizes|pusher-sessions|copies-quick|h200|h200-goals|h200-check|h100-check|profile|sum-in-norm|norm-ab|merge-h200|merge-small|l2-small|rows|knobs|epilogues|kv-loads"
[ $# -gt 0 ] || { echo "usage: bash scripts/gpu_runs.sh STAGE... ($stages)" >&2; exit 2; }
out=${OUT:-bench/results/gpu_runs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1

run() {  # run NAME[:LOG] SECONDS COMMAND...: one step, its output kept (appended to LOG.log when named: the device tool
    # returns at most 8 files a call), a failure does not stop the stage
    local name=${1%%:*} log=${1#*:} limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/summary.txt"
    echo "== $name: $*" >> "$out/$log.log"
    local began=$SECONDS
    timeout "$limit" "$@" >> "$out/$log.log" 2>&1
    echo "   exit $? ($((SECONDS - began)) s)" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$log.log"
}

# 30B-A3B's batch 256 x 640 tokens holds 16 GB of KV beside 61 GB of weights: more than an 80 GB card; there, 256 x 384
moe_cases=1x128x128,64x128x128,256x128x512
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
[ -n "$gpu_mib" ] && [ "$gpu_mib" -lt 100000 ] && moe_cases=1x128x128,64x128x128,256x128x256
# the sessions stage's KV pool: what serving would leave beside the 30B-A3B's 61 GB of weights
session_kv_gib=40
[ -n "$gpu_mib" ] && [ "$gpu_mib" -lt 100000 ] && session_kv_gib=8

site_packages() {  # the HTTP stack and OpenAI client, carried as wheels in .whl/ (filled by scripts/device_wheels.sh)
    [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
}

ab_throughput() {  # ab_throughput LOG "ROUNDS" ["TREES"]: bench/throughput.py's 0.6B batch 1 / 4 at 128- and 2,048-token
    # prompts and batch 64, in each round once a tree (default ". .before"; logs name . "after", .NAME "NAME")
    local log=$1 round tree side
    for round in $2; do
        for tree in ${3:-. .before}; do
            side=${tree#.}; [ -n "$side" ] || side=after
            PYTHONPATH=$tree/src run "throughput_${side}_$round:$log" 90 python3 $tree/bench/throughput.py --shape qwen3-0.6b \
                --cases 1x128x128,1x2048x512,4x2048x512,64x128x128 --hf none
        done
    done
}

for stage in "$@"; do
case $stage in
suite)
    site_packages
    PYTHONPATH=/tmp/site:src run gpu_suite 570 python3 -m pytest -m gpu tests -q -p no:cacheprovider -rfEs
    ;;
final)  # the GPU suite on the tree of the day, split in two calls (~540 s on an H100 in the thirty-second session, past one
    # call with anything beside it): `final` runs the first half of the GPU tests, `final2` the rest
    site_packages
    PYTHONPATH=/tmp/site:src python3 -m pytest -m gpu tests -q -p no:cacheprovider --co 2>/dev/null | grep '::' > /tmp/gpu_ids
    PYTHONPATH=/tmp/site:src run gpu_suite_1 560 python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 $(head -n 140 /tmp/gpu_ids)
    ;;
final2)
    site_packages
    PYTHONPATH=/tmp/site:src python3 -m pytest -m gpu tests -q -p no:cacheprovider --co 2>/dev/null | grep '::' > /tmp/gpu_ids
    PYTHONPATH=/tmp/site:src run gpu_suite_2 560 python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15 $(tail -n +141 /tmp/gpu_ids)
    ;;
dense)
    bash "$0" dense19 prefill rollouts
    ;;
dense19)  # issue 19's done-when: throughput and weight sync, before and after, one call
    bash "$0" throughput19 sync19
    ;;
throughput19)
    if [ -d .before/src ]; then
        PYTHONPATH=.before/src run throughput_before 100 python3 .before/bench/throughput.py \
            --shape qwen3-0.6b --cases 1x128x128,64x128x128,256x128x512 --hf none
    else
        echo "no .before/src: the before runs are skipped" | tee -a "$out/summary.txt"
    fi
    PYTHONPATH=src run throughput_after 100 python3 bench/throughput.py \
        --shape qwen3-0.6b --cases 1x128x128,64x128x128,256x128x512 --hf none
    ;;
sync19 | sync19-before | sync19-after)  # weight sync before and after (or one side, to split it over two calls)
    if [ "$stage" != sync19-after ] && [ -d .before/src ]; then
        PYTHONPATH=.before/src run weight_sync_before 280 python3 .before/bench/weight_sync.py \
            --shapes qwen3-0.6b,qwen3-8b --sections tensor,ipc,disk --reps 5
    fi
    if [ "$stage" != sync19-before ]; then
        PYTHONPATH=src run weight_sync_after 280 python3 bench/weight_sync.py \
            --shapes qwen3-0.6b,qwen3-8b --sections tensor,ipc,disk --reps 5
    fi
    ;;
prefill)  # the prefill call as throughput.py times it, median of 20 instead of one, the same file in both trees
    if [ -d .before/src ]; then
        cp bench/host_prefill.py .before/bench/host_prefill.py
        PYTHONPATH=.before/src run prefill_before 90 python3 .before/bench/host_prefill.py --device cuda --shape qwen3-0.6b \
            --cases 1x128,64x128,256x128 --calls 20 --repeats 2
    fi
    PYTHONPATH=src run prefill_after 90 python3 bench/host_prefill.py --device cuda --shape qwen3-0.6b \
        --cases 1x128,64x128,256x128 --calls 20 --repeats 2
    ;;
rollouts)  # issue 24's sampler and offline rollouts
    PYTHONPATH=src run sampling 40 python3 bench/sampling.py
    PYTHONPATH=src run rollout_0.6b 240 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline --repeats 3
    PYTHONPATH=src run rollout_8b 200 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline --profile
    # the rollouts' tail (few sequences at long contexts) as fixed batches, against the same roofline
    PYTHONPATH=src run tail_0.6b 90 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x2048x256,8x2048x256,16x1024x256 --hf none
    ;;
http)
    site_packages
    PYTHONPATH=/tmp/site:src run rollout_http 400 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --modes sampled \
        --paths offline,generate,generate-stream,completions,completions-stream --incremental-streaming-output --client-procs 4
    PYTHONPATH=/tmp/site:src run rollout_http_frontend 400 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --modes sampled \
        --paths offline,generate,generate-stream,completions,completions-stream --incremental-streaming-output --client-procs 4 \
        --frontend-process
    PYTHONPATH=/tmp/site:src run stream_load 150 python3 bench/stream_load.py --shape qwen3-0.6b --clients 512 --tokens 256
    ;;
http-workers)  # the streaming rollout with the front end in one process and in two (`--frontend-workers`), one call
    site_packages
    for workers in 1 2; do
        PYTHONPATH=/tmp/site:src run "rollout_http_workers$workers" 300 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 \
            --modes sampled --paths offline,generate,generate-stream,completions-stream --incremental-streaming-output --client-procs 4 \
            --frontend-process --frontend-workers "$workers"
    done
    ;;
moe-kernels)
    if [ -d .moe-before/src ]; then
        PYTHONPATH=.moe-before/src run moe_kernels_before 60 python3 .moe-before/bench/moe_kernels.py --no-sweep --batches 1,2,4,8
        PYTHONPATH=.moe-before/src run throughput_moe_before 150 python3 .moe-before/bench/throughput.py \
            --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    else
        echo "no .moe-before/src: the before runs are skipped" | tee -a "$out/summary.txt"
    fi
    PYTHONPATH=src run moe_kernels 300 python3 bench/moe_kernels.py
    ;;
moe-pair)  # the MoE layer kernels before (d115b5c) and after, same flags, no tile sweep
    PYTHONPATH=.moe-before/src run moe_kernels_before 45 python3 .moe-before/bench/moe_kernels.py --no-sweep
    PYTHONPATH=src run moe_kernels_after 60 python3 bench/moe_kernels.py --no-sweep
    ;;
rollout-repeats)  # the 0.6B rollout three times per mode: a one-time cost in the first run shows (and its Triton compiles)
    PYTHONPATH=src run rollout_0.6b_repeats 170 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline --repeats 3
    ;;
moe-quick)  # issue 20's layer kernels without the tile sweep, and the 30B-A3B throughput
    PYTHONPATH=src run moe_kernels 120 python3 bench/moe_kernels.py --no-sweep
    PYTHONPATH=src run throughput_moe 200 python3 bench/throughput.py \
        --shape qwen3-30b-a3b --cases "$moe_cases" --hf none
    ;;
moe)
    PYTHONPATH=src run throughput_moe 200 python3 bench/throughput.py \
        --shape qwen3-30b-a3b --cases "$moe_cases" --hf none
    bash "$0" moe-rollout
    ;;
h200)  # one H200 call's worth (~480 s) of what only an H200 gives: the 30B-A3B rollout of 256 sequences with and without R3
    # (its KV does not fit beside 61 GB of weights on an 80 GB card), the 30B-A3B batch 1, the 0.6B / 8B rollouts, 0.6B batch 1 / 64
    PYTHONPATH=src run h200_moe_rollout 240 python3 bench/rollout.py --shape qwen3-30b-a3b --prompts 32 --n 8 --modes sampled \
        --paths offline --routed-experts
    PYTHONPATH=src run h200_moe_b1 100 python3 bench/throughput.py --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    PYTHONPATH=src run h200_rollout06 80 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline
    PYTHONPATH=src run h200_rollout8b 100 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline --modes sampled
    PYTHONPATH=src run h200_throughput06 40 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128 --hf none
    ;;
h200-goals)  # issue 24's goals on the card its table names (~430 s, `needs_h200`; no H200 figure since the seventeenth
    # session): 0.6B batch 1 / 64, the 0.6B and 8B rollouts sampled and greedy, the 0.6B streaming rollout (carry .whl)
    site_packages
    PYTHONPATH=src run h200_throughput06:h200_goals 60 python3 bench/throughput.py --shape qwen3-0.6b \
        --cases 1x128x128,64x128x128 --hf none
    PYTHONPATH=src run h200_rollout06:h200_goals 100 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline
    PYTHONPATH=src run h200_rollout8b:h200_goals 160 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline
    PYTHONPATH=/tmp/site:src run h200_stream06:h200_goals 150 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 \
        --modes sampled --paths offline,generate,generate-stream --incremental-streaming-output --client-procs 4 --frontend-process
    ;;
h200-check)  # the twenty-ninth session's one H200 call (~510 s, `needs_h200`): the GPU tests of its checkpoint variants (YaRN's
    # table, o_proj / MLP biases through the few-rows kernels) and the engine's, then the rollouts of `h200` (30B-A3B with
    # and without R3, 0.6B, 8B); with the thirtieth's non-finite rows through the Triton decode
    PYTHONPATH=src run h200_check_tests 140 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_checkpoint_variants.py \
        tests/test_gpu_engine.py tests/test_nonfinite_rows.py -rfEs
    PYTHONPATH=src run h200_moe_rollout 240 python3 bench/rollout.py --shape qwen3-30b-a3b --prompts 32 --n 8 --modes sampled \
        --paths offline --routed-experts
    PYTHONPATH=src run h200_rollout06 80 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline
    PYTHONPATH=src run h200_rollout8b 100 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline --modes sampled
    ;;
h100-check)  # h200-check's shape for an 80 GB card (~500 s): the same GPU tests, the 0.6B / 8B rollouts, the 0.6B batch 1 / 64
    # and the 30B-A3B batch 1 (its 256-sequence rollout needs an H200's memory)
    PYTHONPATH=src run h100_check_tests 140 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_checkpoint_variants.py \
        tests/test_gpu_engine.py tests/test_nonfinite_rows.py -rfEs
    PYTHONPATH=src run h100_rollout06 80 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline
    PYTHONPATH=src run h100_rollout8b 100 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline --modes sampled
    PYTHONPATH=src run h100_throughput06 45 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128 --hf none
    PYTHONPATH=src run h100_moe_b1 130 python3 bench/throughput.py --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    ;;
knobs)  # the few-rows matmul's steps in flight by rows (stages_for) against the old 5 / 3 for all rows, 0.6B batch 1-64, twice
    # each, and the kernel's GPU tests (~250 s)
    PYTHONPATH=src run knobs_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_engine.py \
        -k "rows_matmul or bf16_greedy or cuda_graph"
    i=0
    for stages in "" 5,3 "" 5,3; do
        i=$((i + 1))
        (export HOTSWAP_ROWS_STAGES=$stages; stages=${stages/,/-}
         PYTHONPATH=src run "knobs${i}_stages_${stages:-by_rows}" 90 python3 bench/throughput.py --shape qwen3-0.6b \
             --cases 1x128x128,16x128x128,32x128x128,64x128x128 --hf none)
    done
    ;;
sum-in-norm)  # o_proj's and down_proj's split-K partials summed by the norm after them (kernels/split_sum.py), against
    # the tiles' last programs summing them (HOTSWAP_ROWS_SUM_IN_NORM=0): the GPU tests, then 0.6B batch 16-64 twice
    # interleaved, the profile of the batch-64 graph and the sampled rollout, each way (~400 s)
    PYTHONPATH=src run sum_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_engine.py \
        tests/test_checkpoint_variants.py -k "rows_matmul or bf16_greedy or cuda_graph or few_rows or rmsnorm"
    for round in 1 2; do
        for on in 0 1; do
            HOTSWAP_ROWS_SUM_IN_NORM=$on PYTHONPATH=src run "throughput_sum${on}_$round" 60 python3 bench/throughput.py \
                --shape qwen3-0.6b --cases 16x128x128,32x128x128,64x128x128 --hf none
        done
    done
    for on in 0 1; do
        HOTSWAP_ROWS_SUM_IN_NORM=$on PYTHONPATH=src run "profile_sum$on" 60 python3 bench/profile_decode.py --shape qwen3-0.6b \
            --batch 64
        HOTSWAP_ROWS_SUM_IN_NORM=$on PYTHONPATH=src run "rollout_sum$on" 90 python3 bench/rollout.py --shape qwen3-0.6b \
            --prompts 64 --n 8 --paths offline --modes sampled
    done
    ;;
norm-ab)  # the RMSNorm kernel's weight loaded before the PDL wait (eb3faeb, not yet measured) against the tree before it,
    # unpacked in .before (git archive c41cfeb src bench | (mkdir -p .before && tar -x -C .before)): its GPU tests, then the
    # 0.6B batch 32 / 64 each way, interleaved, and the batch-64 profile now (~250 s)
    PYTHONPATH=src run norm_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_engine.py \
        -k "rmsnorm or rows_matmul or bf16_greedy"
    for round in 1 2; do
        PYTHONPATH=.before/src run "throughput_before_$round" 60 python3 .before/bench/throughput.py --shape qwen3-0.6b \
            --cases 32x128x128,64x128x128 --hf none
        PYTHONPATH=src run "throughput_now_$round" 60 python3 bench/throughput.py --shape qwen3-0.6b \
            --cases 32x128x128,64x128x128 --hf none
    done
    PYTHONPATH=src run profile_now 60 python3 bench/profile_decode.py --shape qwen3-0.6b --batch 64
    ;;
merge-small)  # the thirty-ninth session's two decode attention changes apart, as run in the fortieth with this tree at 8fa57ae
    # (a sequence of at most 8 splits merges an 8-row tile, and splits that whole key blocks leave without keys write
    # nothing; the second was then reverted, so this tree is now .small's kernel),
    # .small (fcacd67: the 8-row tile only) and .before (c250578: the launch's whole tile); unpack them with
    #   git archive fcacd67 src bench | (mkdir -p .small && tar -x -C .small)
    #   git archive c250578 src bench | (mkdir -p .before && tar -x -C .before)
    # batch 1 / 4 at 128- and 2,048-token prompts and batch 64, interleaved twice, then decode attention's GPU tests
    # (~520 s on a cold machine: its first runs compile every kernel)
    ab_throughput merge_small "1 2" ". .small .before"
    PYTHONPATH=src run attention_tests:merge_small_tests 280 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
        tests/test_fused_kernels.py -k "decode or attention"
    ;;
l2-small)  # the small batches' L2 prefetch of the MLP weights while attention runs (kernels/l2_prefetch.py, fortieth
    # session, off by default until this runs) against off: its GPU tests, 0.6B batch 1 (short and long contexts), 4 and
    # 16 interleaved twice (the bound moved to 16 rows so batch 16 takes it), the batch-1 profile each way, the sampled
    # rollout each way, whose tail runs few rows (~370 s on a cold machine)
    PYTHONPATH=src run l2_tests:l2_small_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_l2_prefetch.py
    for round in 1 2; do
        for on in 0 1; do
            HOTSWAP_L2_PREFETCH=$on HOTSWAP_L2_PREFETCH_MAX_ROWS=16 PYTHONPATH=src run "throughput_l2_${on}_$round:l2_small" 90 \
                python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,1x2048x512,4x128x128,16x128x128 --hf none
        done
    done
    for on in 0 1; do
        HOTSWAP_L2_PREFETCH=$on PYTHONPATH=src run "profile_l2_$on:l2_small_profile" 60 python3 bench/profile_decode.py \
            --shape qwen3-0.6b --batch 1
    done
    for on in 0 1; do
        HOTSWAP_L2_PREFETCH=$on HOTSWAP_L2_PREFETCH_MAX_ROWS=16 PYTHONPATH=src run "rollout_l2_$on:l2_small" 90 python3 \
            bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline --modes sampled
    done
    ;;
merge-h200)  # one call for a scarce machine (~560 s, ran in the thirty-ninth session): decode attention's tile merge (thirty-
    # eighth session) against the loop over splits before it (0fdb108 in .before): its GPU tests and one before / after
    # round, then on an H200 issue 24's offline rollouts (0.6B sampled and greedy, 8B sampled), on an H100 a second round
    PYTHONPATH=src run attention_tests:merge_tile_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
        tests/test_fused_kernels.py -k "decode or attention"
    rounds="1"
    [ -n "$gpu_mib" ] && [ "$gpu_mib" -lt 100000 ] && rounds="1 2"
    ab_throughput merge_tile "$rounds"
    if [ "$rounds" = 1 ]; then
        PYTHONPATH=src run h200_rollout06:h200_goals 100 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline
        PYTHONPATH=src run h200_rollout8b:h200_goals 130 python3 bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --paths offline \
            --modes sampled
    fi
    ;;
rows)  # the few-rows decode matmul: its GPU tests, beside cuBLAS with a tile sweep, and whole decode with it on and off
    PYTHONPATH=src run rows_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_engine.py \
        -k "rows_matmul or bf16_greedy or cuda_graph"
    PYTHONPATH=src run rows_matmul 200 python3 bench/rows_matmul.py --shape qwen3-0.6b --rows 16,64 --sweep
    for on in 0 1; do
        HOTSWAP_ROWS_MATMUL=$on PYTHONPATH=src run "throughput_rows$on" 60 python3 bench/throughput.py --shape qwen3-0.6b \
            --cases 1x128x128,16x128x128,64x128x128 --hf none
    done
    ;;
epilogues)  # the few-rows matmul's epilogues (SiLU-and-mul, q/k/v heads) and decode attention's keys loaded before the PDL wait:
    # their GPU tests, then whole decode with each off and all on, and the decode graphs' critical path (~400 s)
    PYTHONPATH=src run epilogue_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_engine.py \
        tests/test_triton_attention.py -k "rows_matmul or bf16_greedy or cuda_graph or logprob or decode or split"
    for off in HOTSWAP_ROWS_EPILOGUES HOTSWAP_DECODE_PRELOAD ""; do  # each switched off, then all on
        [ -n "$off" ] && export "$off=0"
        PYTHONPATH=src run "throughput_off_${off:-none}" 60 python3 bench/throughput.py --shape qwen3-0.6b \
            --cases 1x128x128,16x128x128,32x128x128,64x128x128 --hf none
        [ -n "$off" ] && unset "$off"
    done
    PYTHONPATH=src run profile_decode 90 python3 bench/profile_decode.py --shape qwen3-0.6b --batch 1 64
    ;;
kv-loads)  # decode attention's KV loads (evict-first; K and V asked for together, since reverted) against the tree in .before (the
    # twenty-fourth session's start: git archive d7097ab src bench), and with the hint off; 0.6B batch 1 / 64 twice, the
    # sampled rollout (~280 s)
    [ -d .before/src ] || echo "no .before/src: the before runs are skipped" | tee -a "$out/summary.txt"
    for rep in 1 2; do
        [ -d .before/src ] && PYTHONPATH=.before/src run "throughput_before_$rep" 90 python3 .before/bench/throughput.py --shape qwen3-0.6b \
            --cases 1x128x128,64x128x128 --hf none
        PYTHONPATH=src run "throughput_now_$rep" 90 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128 --hf none
    done
    HOTSWAP_EVICT_FIRST=0 PYTHONPATH=src run throughput_now_evict0 90 python3 bench/throughput.py --shape qwen3-0.6b \
        --cases 1x128x128,64x128x128 --hf none
    [ -d .before/src ] && PYTHONPATH=.before/src run rollout_before 90 python3 .before/bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 \
        --paths offline --modes sampled
    PYTHONPATH=src run rollout_now 90 python3 bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8 --paths offline --modes sampled
    ;;
profile)  # the decode graphs' kernels by device time (0.6B batch 1 / 64, 30B-A3B batch 1): the last per-kernel split of the 0.6B's
    # batch-64 step is the fifth session's; what a fusion or a matmul of ours would have to beat (~200 s)
    PYTHONPATH=src run profile06 90 python3 bench/profile_decode.py --shape qwen3-0.6b --batch 1 64
    PYTHONPATH=src run profile_moe 120 python3 bench/profile_decode.py --shape qwen3-30b-a3b --batch 1
    ;;
moe-r3)  # issue 20's R3 cost on an 80 GB card: 96 sequences, whose KV fits beside the 61 GB of weights (no preemption)
    PYTHONPATH=src run rollout_moe_r3 400 python3 bench/rollout.py --shape qwen3-30b-a3b --prompts 12 --n 8 --modes sampled \
        --paths offline --routed-experts
    ;;
moe-rollout)  # on an 80 GB card the KV pool beside 61 GB of weights (~13 GB, ~140K tokens) is below what 256 sequences reach: it preempts
    PYTHONPATH=src run rollout_moe 360 python3 bench/rollout.py --shape qwen3-30b-a3b --prompts 32 --n 8 --modes sampled \
        --paths offline --routed-experts
    ;;
sessions)  # a weight-update session's cost with its originals in the lent KV pool (sized as serving sizes it), and not lent
    PYTHONPATH=src run weight_sync_sessions 400 python3 bench/weight_sync.py --shapes qwen3-8b,qwen3-30b-a3b --sections tensor --reps 3 \
        --budget-s 380 --kv-gib "$session_kv_gib"
    ;;
fusions)
    PYTHONPATH=src run fusion_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe.py tests/test_fused_kernels.py \
        tests/test_triton_attention.py tests/test_moe.py tests/test_gpu_engine.py \
        -k "moe or token_grid or last_to_finish or splits or cuda_graph or one_split or finishing_its_heads or bf16_greedy"
    PYTHONPATH=src run moe_kernels_pairs 40 python3 bench/moe_kernels.py --no-sweep --batches 1,8
    PYTHONPATH=src run throughput_moe_b1 130 python3 bench/throughput.py --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    PYTHONPATH=src run throughput_b1_merge 45 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128 --hf none
    HOTSWAP_DECODE_MERGE=0 PYTHONPATH=src run throughput_b1_merge_kernel 45 python3 bench/throughput.py --shape qwen3-0.6b \
        --cases 1x128x128,64x128x128 --hf none
    if [ -d .moe-before/src ]; then
        PYTHONPATH=.moe-before/src run throughput_moe_b1_before 110 python3 .moe-before/bench/throughput.py \
            --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    fi
    ;;
batch1)  # the nineteenth session's qkv matmul finishing its heads: batch 1 of the 0.6B and the 30B-A3B (after `fusions`)
    PYTHONPATH=src run throughput_b1_heads 45 python3 bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128 --hf none
    PYTHONPATH=src run throughput_moe_b1_heads 130 python3 bench/throughput.py --shape qwen3-30b-a3b --cases 1x128x128 --hf none
    ;;
attention-mix)
    PYTHONPATH=src run attention_mix 300 python3 bench/attention_kernels.py --sweep mix
    ;;
host-ab)  # the host step's changes since .hs-before (unpacked from the thirty-first session's start, be24495) on the graph path:
    # the 0.6B batch 64 throughput and host step, before / after interleaved twice (~240 s)
    for round in 1 2; do
        for side in before after; do
            root=.; [ "$side" = before ] && root=.hs-before  # each bench puts its own tree's src first on the path
            run "host_ab_tput_${side}_$round" 60 python3 $root/bench/throughput.py --shape qwen3-0.6b --cases 64x128x128 --hf none
            run "host_ab_step_${side}_$round" 60 python3 $root/bench/host_step.py --shape qwen3-0.6b --batch 64 --prompt 128 \
                --steps 128 --mode sampled --device cuda
        done
    done
    ;;
pusher)  # the trainer library's IPC pusher, calls_in_flight 1 against 2, on the 61 GB 30B-A3B push (queue and HTTP; sessions off, as
    # the ipc section's figures; needs the FastAPI/uvicorn wheels in .whl/ for HTTP)
    site_packages
    PYTHONPATH=/tmp/site:src run pusher_moe 420 python3 bench/weight_sync.py --shapes qwen3-30b-a3b --sections pusher --pusher-no-sessions
    ;;
pusher-sessions)  # the pusher's default path (sessions) on the 8B with unpacked buckets: what the engine's saves cost a push, and
    # whether replies after the copies help there (the thirty-fourth session's packed run: 58.8 / 59.7 ms, bytes-bound)
    PYTHONPATH=src run pusher_sessions 150 python3 bench/weight_sync.py --shapes qwen3-8b --sections pusher --kv-gib 24 \
        --sources aliased --pusher-transport queue --pusher-in-flight 1,3 --pusher-replies after-copies,synchronised --pusher-reps 3
    PYTHONPATH=src run pusher_no_sessions 80 python3 bench/weight_sync.py --shapes qwen3-8b --sections pusher --kv-gib 24 \
        --sources aliased --pusher-transport queue --pusher-in-flight 1,3 --pusher-no-sessions --pusher-reps 3
    ;;
copies-quick)  # pusher-sizes for a short budget (~200 s): the tensor paths' GPU tests, the pusher after only (the before figures: the
    # thirty-third session's call 3, same settings), 512 MiB buckets 1-3 in flight and 2 GiB 2 in flight
    PYTHONPATH=src run copy_replies_tests 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_copy_replies.py \
        tests/test_trainer_pipeline.py tests/test_gpu_weight_copy.py -rfEs
    run pusher_quick 130 python3 bench/weight_sync.py --shapes qwen3-30b-a3b --sections pusher --pusher-no-sessions \
        --pusher-transport queue --pusher-bucket-kib 524288,2097152 --pusher-in-flight 1,2,3 --pusher-reps 4
    ;;
pusher-sizes)  # replies after the copies (scheduler/copy_replies.py): the GPU tests of the tensor paths, then the pusher through a
    # queue (no FastAPI needed) on the 61 GB 30B-A3B push, before (.pipe-before: git archive 9180763 src bench) and after, 512 MiB
    # buckets 1-2 calls in flight, then after alone in 2 GiB buckets and 3 in flight (~330 s)
    PYTHONPATH=src run copy_replies_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_copy_replies.py \
        tests/test_trainer_pipeline.py tests/test_gpu_weight_copy.py tests/test_sglang_payloads.py -rfEs
    for side in before after; do
        root=.; [ "$side" = before ] && root=.pipe-before
        [ -d "$root/src" ] || continue
        run "pusher_512_$side" 100 python3 $root/bench/weight_sync.py --shapes qwen3-30b-a3b --sections pusher --pusher-no-sessions \
            --pusher-transport queue --pusher-bucket-kib 524288 --pusher-in-flight 1,2 --pusher-reps 6
    done
    run pusher_sizes_after 120 python3 bench/weight_sync.py --shapes qwen3-30b-a3b --sections pusher --pusher-no-sessions \
        --pusher-transport queue --pusher-bucket-kib 524288,2097152 --pusher-in-flight 2,3 --pusher-reps 6
    ;;
moe-sync)
    PYTHONPATH=src run weight_sync_moe 570 python3 bench/weight_sync.py --shapes qwen3-30b-a3b --sections tensor,ipc --reps 3 --budget-s 540 \
        --ipc-bucket-mib 512,2048
    ;;
*)
    echo "unknown stage: $stage ($stages)" >&2
    exit 2
    ;;
esac
done
