"""The Batcher alone: admission under page and token budgets, chunked prefill, preemption, prefix hits,
and progress under KV pressure. No model: a fake step marks what the runner would compute, and sampled
tokens are appended by hand, as the scheduler's process() does."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.protocol import GenerateRequest
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler.batcher import Batcher, ScheduledBatch
from hotswap.scheduler.invariant_checker import InvariantChecker
from hotswap.scheduler.overlap import undo_launch
from hotswap.scheduler.sequence import Sequence, Status


def make_batcher(num_pages=32, page_size=4, *, prefix_cache=True, max_running=8, token_budget=256, chunk=64,
                 max_context_len=1024):
    alloc = PageAllocator(num_pages=num_pages, page_size=page_size)
    cache = RadixPrefixCache(alloc) if prefix_cache else None
    failed: list[tuple[Sequence, str]] = []

    def fail(seq: Sequence, message: str) -> None:
        failed.append((seq, message))
        batcher.finish(seq)

    batcher = Batcher(allocator=alloc, prefix_cache=cache, max_running_requests=max_running,
                      max_num_batched_tokens=token_budget, max_context_len=max_context_len,
                      chunked_prefill_size=chunk, fail=fail)
    return batcher, alloc, failed


def seq(prompt: list[int], max_new_tokens: int = 4, rid: str = "r") -> Sequence:
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return Sequence(req=GenerateRequest(rid=rid, input_ids=list(prompt), sampling_params=sp, seed=0, sink=lambda out: None))


def read_back(batch: ScheduledBatch, batcher: Batcher, token: int | Callable[[Sequence], int] = 7,
              stops: Callable[[Sequence], bool] = lambda seq: False) -> None:
    """What process() does with a step's sampled tokens: append them (`token`, or `token(seq)`), finish sequences
    at their limit or when `stops(seq)` says so (an eos, say)."""
    for s, e in zip(batch.seqs, batch.entries):
        if not e.sample:
            continue
        s.pending -= 1
        if s.status is Status.FINISHED:
            continue
        s.output_ids.append(token(s) if callable(token) else token)
        if stops(s) or len(s.output_ids) >= s.req.sampling_params.max_new_tokens:
            batcher.finish(s)


def run_to_completion(batcher: Batcher, max_steps: int = 2000) -> int:
    steps = 0
    while batcher.has_work:
        batch = batcher.schedule()
        assert batch is not None, f"no progress: running={len(batcher.running)} waiting={len(batcher.waiting)}"
        read_back(batch, batcher)
        steps += 1
        assert steps < max_steps
    return steps


def assert_accounted(batcher: Batcher, alloc: PageAllocator) -> None:
    assert InvariantChecker(allocator=alloc, prefix_cache=batcher.prefix_cache).check_idle() == []


def test_admits_within_the_running_limit():
    batcher, alloc, _ = make_batcher(max_running=2)
    for i in range(3):
        batcher.add(seq(range(10 * i, 10 * i + 8), rid=f"r{i}"))
    batch = batcher.schedule()
    assert [s.rid for s in batch.seqs] == ["r0", "r1"]
    assert [len(e.input_ids) for e in batch.entries] == [8, 8] and all(e.sample for e in batch.entries)
    assert alloc.num_used == 2 * 2  # 8 tokens in 4-token pages each
    assert [s.rid for s in batcher.waiting] == ["r2"] and batcher.waiting[0].pages == []


def test_token_budget_cuts_the_last_admitted_prompt_into_a_chunk():
    batcher, alloc, _ = make_batcher(token_budget=12)
    for i in range(3):
        batcher.add(seq(range(10 * i, 10 * i + 8), rid=f"r{i}"))
    batch = batcher.schedule()
    assert [(s.rid, len(e.input_ids), e.sample) for s, e in zip(batch.seqs, batch.entries)] == [("r0", 8, True), ("r1", 4, False)]
    read_back(batch, batcher)
    batch = batcher.schedule()  # r0 decodes (1), r1 finishes its prompt (4), r2 gets the rest of the budget (7)
    assert [(s.rid, len(e.input_ids), e.start_pos) for s, e in zip(batch.seqs, batch.entries)] == [("r0", 1, 8), ("r1", 4, 4), ("r2", 7, 0)]
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def test_chunked_prefill_splits_a_long_prompt():
    batcher, alloc, _ = make_batcher(chunk=16, token_budget=16)
    s = seq(range(40), max_new_tokens=1)
    batcher.add(s)
    sizes = []
    while batcher.has_work:
        batch = batcher.schedule()
        sizes.append((len(batch.entries[0].input_ids), batch.entries[0].start_pos, batch.entries[0].sample))
        read_back(batch, batcher)
    assert sizes == [(16, 0, False), (16, 16, False), (8, 32, True)]
    assert s.output_ids == [7] and s.status is Status.FINISHED
    assert_accounted(batcher, alloc)


def test_prefix_hit_reuses_cached_pages_and_leaves_one_token():
    batcher, alloc, _ = make_batcher()
    prompt = list(range(100, 116))  # four full pages
    first = seq(prompt, max_new_tokens=1, rid="a")
    batcher.add(first)
    run_to_completion(batcher)
    second = seq(prompt + [1, 2], max_new_tokens=1, rid="b")
    batcher.add(second)
    batch = batcher.schedule()
    assert batch.entries[0].start_pos == 16 and second.cached_tokens == 16
    same = seq(prompt, max_new_tokens=1, rid="c")  # identical prompt: the last token is still computed
    batcher.add(same)
    read_back(batch, batcher)
    batch = batcher.schedule()
    assert batch.entries[0].start_pos == 12 and batch.entries[0].input_ids == prompt[12:]
    read_back(batch, batcher)
    assert_accounted(batcher, alloc)


def test_partial_prefix_match_leaves_the_unmatched_tail_evictable():
    batcher, alloc, _ = make_batcher(num_pages=12)
    cached = list(range(200, 232))  # 8 pages cached
    batcher.add(seq(cached, max_new_tokens=1, rid="warm"))
    run_to_completion(batcher)
    assert alloc.num_free <= 4
    # shares 2 pages with the cached entry, then needs 8 pages of its own: the 6-page tail must be evicted
    s = seq(cached[:8] + list(range(900, 930)), max_new_tokens=1, rid="partial")
    batcher.add(s)
    run_to_completion(batcher)
    assert s.cached_tokens == 8 and s.status is Status.FINISHED
    assert_accounted(batcher, alloc)


def test_preempts_the_newest_when_pages_run_out_and_everyone_finishes():
    batcher, alloc, failed = make_batcher(num_pages=12, page_size=4)
    seqs = [seq(range(50 * i, 50 * i + 10), max_new_tokens=16, rid=f"r{i}") for i in range(4)]
    for s in seqs:
        batcher.add(s)
    run_to_completion(batcher)
    assert batcher.num_preemptions > 0 and not failed
    assert all(len(s.output_ids) == 16 for s in seqs)
    assert_accounted(batcher, alloc)


def test_waiting_requests_hold_no_pages():
    batcher, alloc, _ = make_batcher(num_pages=10)
    prompt = list(range(300, 316))
    batcher.add(seq(prompt, max_new_tokens=1, rid="warm"))
    run_to_completion(batcher)  # 4 pages cached, 6 free
    batcher.add(seq(list(range(500, 520)), max_new_tokens=8, rid="running"))  # takes 5
    batcher.add(seq(prompt + list(range(5, 13)), max_new_tokens=2, rid="waiting"))  # hits 4 cached pages, needs 2 more
    batch = batcher.schedule()
    assert [s.rid for s in batcher.waiting] == ["waiting"] and batcher.waiting[0].pages == []
    assert all(alloc.refcount[p] == 1 for p in batcher.prefix_cache.all_pages())
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def test_shared_prefixes_under_pressure_never_wedge():
    """Warm prefixes fill most of the pool, then long generations over them: always some progress."""
    batcher, alloc, failed = make_batcher(num_pages=48, page_size=4, chunk=32, token_budget=64)
    prompts = [list(range(1000 + 40 * i, 1000 + 40 * i + 12)) + list(range(10, 14 + i)) for i in range(8)]
    for i, p in enumerate(prompts):
        batcher.add(seq(p, max_new_tokens=1, rid=f"warm{i}"))
    run_to_completion(batcher)
    long = [seq(p, max_new_tokens=120, rid=f"gen{i}") for i, p in enumerate(prompts)]
    for s in long:
        batcher.add(s)
    run_to_completion(batcher, max_steps=20000)
    assert not failed
    assert all(len(s.output_ids) == 120 for s in long)
    assert_accounted(batcher, alloc)


def test_a_request_larger_than_the_cache_fails_with_a_message():
    batcher, alloc, failed = make_batcher(num_pages=6, page_size=4)
    big = seq(range(400, 420), max_new_tokens=40, rid="big")  # 20 prompt tokens fit; 60 never do
    small = seq(range(600, 604), max_new_tokens=2, rid="small")
    batcher.add(big)
    batcher.add(small)
    run_to_completion(batcher)
    assert [s.rid for s, _ in failed] == ["big"]
    assert "does not fit the KV cache" in failed[0][1] and "6" in failed[0][1]
    assert len(small.output_ids) == 2
    assert_accounted(batcher, alloc)


def test_draining_readmits_started_requests_but_admits_no_new_ones():
    batcher, alloc, _ = make_batcher(num_pages=8, page_size=4)
    a, b = seq(range(10, 18), max_new_tokens=12, rid="a"), seq(range(30, 38), max_new_tokens=12, rid="b")
    batcher.add(a)
    batcher.add(b)
    while not batcher.num_preemptions:
        read_back(batcher.schedule(), batcher)
    assert batcher.has_started
    batcher.add(seq(range(60, 64), max_new_tokens=2, rid="new"))
    while batcher.has_started:
        batch = batcher.schedule(admit_new=False)
        assert "new" not in [s.rid for s in batch.seqs]
        read_back(batch, batcher)
    assert len(a.output_ids) == len(b.output_ids) == 12
    assert [s.rid for s in batcher.waiting] == ["new"]
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


@pytest.mark.parametrize("n", [0, 1])
def test_page_allocator_refcounts(n):
    alloc = PageAllocator(num_pages=4, page_size=2)
    pages = alloc.allocate(2 + n)
    alloc.retain(pages[:1])
    alloc.release(pages)
    assert alloc.num_free == 3 and alloc.refcount[pages[0]] == 1
    alloc.release(pages[:1])
    assert alloc.num_free == 4
    with pytest.raises(RuntimeError, match="released more often"):
        alloc.release(pages[:1])


def test_cache_package_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import hotswap.cache.page_allocator, hotswap.cache.radix_cache; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_radix_match_inside_an_edge_splits_it_and_only_the_tail_is_evicted():
    alloc = PageAllocator(num_pages=8, page_size=2)
    cache = RadixPrefixCache(alloc)
    tokens = list(range(10, 22))  # 6 pages, one edge
    pages = alloc.allocate(6)
    cache.insert(tokens, pages)
    alloc.release(pages)  # only the tree holds them now
    hit = cache.match(tokens[:5] + [99])  # two full pages match
    assert hit == pages[:2]
    alloc.retain(hit)  # a sequence uses the matched head
    assert cache.evict(8) == 4 and alloc.num_free == 6  # the tail goes, the head in use stays
    assert cache.match(tokens) == pages[:2]
    alloc.release(hit)
    assert cache.evict(8) == 2 and alloc.num_free == 8 and cache.all_pages() == []


def test_min_new_tokens_ids_are_made_once_per_request_and_dropped_once_reached():
    batcher, _, _ = make_batcher()
    batcher.eos_token_ids = frozenset({2})
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, min_new_tokens=3, stop_token_ids=[9, 4, 9])
    s = Sequence(req=GenerateRequest(rid="m", input_ids=[5, 6, 7], sampling_params=sp, seed=0, sink=lambda out: None))
    batcher.add(s)
    seen = []
    while batcher.has_work:
        batch = batcher.schedule()
        seen.append(batch.entries[0].banned_ids)
        read_back(batch, batcher)
    assert seen[0] == [2, 4, 9] and all(b is seen[0] for b in seen[:3])  # one list for the request's life
    assert seen[3:] == [None] * 3


def test_penalized_output_ids_are_converted_once_as_they_come():
    """The ids penalties count each step are the sequence's own int64 array: a step converts only the new
    tokens, and an array handed out earlier keeps what it held while the sequence grows."""
    sp = SamplingParams(max_new_tokens=64, temperature=0.0, frequency_penalty=0.5)
    s = Sequence(req=GenerateRequest(rid="f", input_ids=[5, 5, 6], sampling_params=sp, seed=0, sink=lambda out: None))
    assert s.counted_output().tolist() == []
    seen = []
    for t in range(40):
        s.output_ids.append(t % 7)
        seen.append(s.counted_output())
        assert s.counted_len == len(s.output_ids)
    assert [a.tolist() for a in seen] == [[t % 7 for t in range(k + 1)] for k in range(40)]
    assert s.distinct_prompt_ids().tolist() == [5, 6] and s.distinct_prompt_ids() is s.distinct_prompt_ids()


def test_repeated_prompts_wait_one_step_and_share_the_first_ones_prompt_pages():
    """GRPO's n samples of one prompt: the first computes it, the others match its pages a step later and
    compute only the last page; other prompts are admitted meanwhile."""
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4)
    prompt = list(range(100, 118))  # 18 tokens: 4 full pages a match can give, 2 tokens left to compute
    samples = [seq(prompt, max_new_tokens=2, rid=f"s{i}") for i in range(4)]
    other = seq(range(500, 510), max_new_tokens=2, rid="other")
    for s in [*samples, other]:
        batcher.add(s)
    first = batcher.schedule()
    assert [s.rid for s in first.seqs] == ["s0", "other"]
    assert [s.rid for s in batcher.waiting] == ["s1", "s2", "s3"]
    read_back(first, batcher)
    second = batcher.schedule()
    followers = [(s.rid, e.start_pos, len(e.input_ids)) for s, e in zip(second.seqs, second.entries) if s.rid in ("s1", "s2", "s3")]
    assert followers == [("s1", 16, 2), ("s2", 16, 2), ("s3", 16, 2)]
    assert all(s.cached_tokens == 16 and s.pages[:4] == samples[0].pages[:4] for s in samples[1:])
    read_back(second, batcher)
    run_to_completion(batcher)
    assert all(len(s.output_ids) == 2 for s in [*samples, other])
    assert_accounted(batcher, alloc)


def test_repeated_prompts_wait_for_every_chunk_of_a_long_prompt():
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4, chunk=8)
    prompt = list(range(100, 124))  # 24 tokens: three chunks of 8
    lead, follower = seq(prompt, max_new_tokens=3, rid="lead"), seq(prompt, max_new_tokens=1, rid="follower")
    batcher.add(lead)
    batcher.add(follower)
    planned = []
    while follower.status is Status.WAITING:
        batch = batcher.schedule()
        planned.append([(s.rid, e.start_pos) for s, e in zip(batch.seqs, batch.entries)])
        read_back(batch, batcher)
    assert planned == [[("lead", 0)], [("lead", 8)], [("lead", 16)], [("lead", 24), ("follower", 20)]]
    assert follower.cached_tokens == 20
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def test_no_wait_for_prompt_logprobs_a_shorter_shared_prefix_or_a_lead_that_stopped():
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4)
    prompt = list(range(100, 118))
    lead = seq(prompt, max_new_tokens=2, rid="lead")
    scored = seq(prompt, max_new_tokens=2, rid="scored")  # wants every prompt position's logprob: nothing to share
    scored.req.sampling_params.return_logprob = True
    scored.req.sampling_params.logprob_start_len = 0
    prefix_only = seq(prompt[:12] + [1, 2, 3, 4, 5, 6], max_new_tokens=2, rid="prefix")  # same start, other prompt
    for s in (lead, scored, prefix_only):
        batcher.add(s)
    batch = batcher.schedule()
    assert [s.rid for s in batch.seqs] == ["lead", "scored", "prefix"]
    read_back(batch, batcher)
    run_to_completion(batcher)
    # a lead that finished (or was aborted) before its followers came in holds nobody back
    again = [seq(prompt, max_new_tokens=1, rid=f"again{i}") for i in range(2)]
    late_lead = seq(list(range(300, 318)), max_new_tokens=1, rid="late")
    batcher.add(late_lead)
    batch = batcher.schedule()
    batcher.finish(late_lead)  # aborted while its prompt is in flight
    for s in again:
        batcher.add(s)
    batcher.add(seq(list(range(300, 318)), max_new_tokens=1, rid="after-abort"))
    read_back(batch, batcher)
    batch = batcher.schedule()
    # the prompt cached when its lead finished: nobody computes its full pages, nobody waits
    assert [s.rid for s in batch.seqs] == ["again0", "again1", "after-abort"]
    assert [s.cached_tokens for s in again] == [16, 16]
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def _tokens_by_page(cache: RadixPrefixCache) -> set:
    out, stack = set(), [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        path = prefix + node.key
        for k in range(len(node.pages)):
            out.add(path[: len(prefix) + (k + 1) * cache.page_size])
        stack.extend((c, path) for c in node.children.values())
    return out


def test_radix_eviction_keeps_its_lru_heap_across_calls_and_evicts_as_a_full_walk_would():
    """The cache against bench/prefix_cache.py's full-walk eviction (what it did before it kept its heap): random
    inserts, matches (some held, like running sequences), releases and evictions on both; the same pages freed,
    the same prefixes left, the leaf count right."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from prefix_cache import WalkingCache

    rng = random.Random(7)
    caches = [(alloc := PageAllocator(num_pages=4096, page_size=4), RadixPrefixCache(alloc)),
              (alloc2 := PageAllocator(num_pages=4096, page_size=4), WalkingCache(alloc2))]
    held: list[tuple[list[int], list[int]]] = []  # per cache: pages a "running sequence" holds
    for step in range(1500):
        op = rng.random()
        prompt = [rng.randrange(6)] + [rng.randrange(4) for _ in range(rng.randrange(4, 40))]
        if op < 0.45:  # a sequence ends: its pages are cached
            n = len(prompt) // 4
            for alloc, cache in caches:
                pages = alloc.allocate(n)
                cache.insert(prompt, pages)
                alloc.release(pages)
        elif op < 0.7:  # a sequence starts on a cached prefix and holds it for a while
            got = [cache.match(prompt) for _, cache in caches]
            assert len(got[0]) == len(got[1])
            for (alloc, _), pages in zip(caches, got):
                alloc.retain(pages)
            held.append(tuple(got))
        elif op < 0.85 and held:  # a running sequence ends
            pages = held.pop(rng.randrange(len(held)))
            for (alloc, _), p in zip(caches, pages):
                alloc.release(p)
        else:
            want = rng.randrange(1, 30)
            freed = [cache.evict(want) for _, cache in caches]
            assert freed[0] == freed[1], step
        assert _tokens_by_page(caches[0][1]) == _tokens_by_page(caches[1][1]), step
        assert caches[0][1]._num_leaves == len(caches[0][1]._leaves()), step
        assert caches[0][0].num_free == caches[1][0].num_free, step
    assert len(caches[0][1]._lru) <= 4 * caches[0][1]._num_leaves + 1024


def test_a_lead_whose_step_never_launched_gives_its_followers_no_unwritten_pages():
    """The step planning a lead's prompt fails to launch (a device fault, or the lead's row refused): its KV was
    never written, so the follower must compute the prompt itself, not match the lead's pages."""
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4)
    prompt = list(range(100, 118))
    lead, follower = seq(prompt, max_new_tokens=2, rid="lead"), seq(prompt, max_new_tokens=2, rid="follower")
    batcher.add(lead)
    batcher.add(follower)
    batch = batcher.schedule()
    assert batch.seqs == [lead]
    undo_launch(batch.seqs, batch.entries)  # what Scheduler.launch does when the run raises
    batcher.finish(lead)
    batch = batcher.schedule()
    assert batch.seqs == [follower]
    assert follower.cached_tokens == 0 and batch.entries[0].start_pos == 0
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def _overlapped_run(seed: int) -> int:
    """One random run as the scheduler loop drives the batcher: step N+1 planned and launched before step N's
    tokens are read back; repeated prompts, prompts with a common head (shorter and longer than FOLLOW_MIN_TOKENS),
    prompts extending another one, some owing prompt logprobs, prompt-only requests (max_new_tokens 0); aborts,
    retracts and weight updates under a pause in place (no step in flight), launches that fail and rows refused
    before the forward; pools small enough that prefix-cache leaves in use are parked. A model of the KV pages
    checks that every step reads only what an earlier launched step wrote there for the same tokens, with the
    weights its sequence started on or newer; and no request that fits the pool alone is failed as too big."""
    import random

    from hotswap.scheduler.overlap import mark_sample_rows
    from hotswap.scheduler.step_output import prompt_scored

    rng = random.Random(seed)
    ps = rng.choice([2, 4])
    batcher, alloc, failed = make_batcher(num_pages=rng.choice([12, 24, 64]), page_size=ps, chunk=rng.choice([4, 8, 64]),
                                          token_budget=rng.choice([8, 16, 64]), max_running=rng.choice([2, 4, 8]))
    kv: dict[tuple[int, int], tuple[object, int]] = {}  # (page, slot) -> (token written there, or a placeholder
    # until read back; the cache epoch of the weights that wrote it)
    head = [rng.randrange(5) for _ in range(rng.choice([rng.randrange(0, 24), rng.randrange(32, 48)]))]
    prompts = [(head if k % 2 else []) + [rng.randrange(5) for _ in range(rng.randrange(3, 30))] for k in range(4)]
    prompts += [p + [rng.randrange(5) for _ in range(rng.randrange(1, 12))] for p in rng.sample(prompts, 2)]
    added: list[Sequence] = []
    inflight = None

    def forward(pairs):
        for s, e in pairs:
            toks = s.token_ids
            for pos in range(e.start_pos):
                token, epoch = kv.get((e.pages[pos // ps], pos % ps), (None, -1))
                assert token == toks[pos] and epoch >= s.cache_epoch, (seed, s.rid, pos)
            for pos in range(e.start_pos, e.start_pos + len(e.input_ids)):
                kv[(e.pages[pos // ps], pos % ps)] = (toks[pos] if pos < len(toks) else (id(s), pos), batcher.cache_epoch)

    def read_back_step(pairs):
        for s, e in pairs:
            if not e.sample:
                if prompt_scored(s, e):  # Scheduler.process: a prompt-only request is done once prefilled
                    batcher.finish(s)
                continue
            s.pending -= 1
            if s.status is Status.FINISHED:
                continue
            tok, pos = rng.randrange(5), s.num_tokens
            s.output_ids.append(tok)
            for key in [k for k, v in kv.items() if v[0] == (id(s), pos)]:
                kv[key] = (tok, kv[key][1])
            # a stop token (known only now: the step after may be planned for it already) or its length limit
            if rng.random() < 0.1 or len(s.output_ids) >= s.req.sampling_params.max_new_tokens:
                batcher.finish(s)

    for step in range(3000):
        if step < 400 and rng.random() < 0.3 and len(added) < 60:
            p = rng.choice(prompts)
            if added and rng.random() < 0.2:  # a next turn: another request's prompt and what it generated so far, and more
                p = rng.choice(added).token_ids + [rng.randrange(5) for _ in range(rng.randrange(1, 8))]
            for _ in range(rng.choice([1, 1, 3])):
                s = seq(p, max_new_tokens=rng.randrange(0 if rng.random() < 0.1 else 1, 6), rid=f"s{len(added)}")
                if rng.random() < 0.2 or s.req.sampling_params.max_new_tokens == 0:  # prompt-only requests score it
                    s.req.sampling_params.return_logprob = True
                    s.req.sampling_params.logprob_start_len = rng.randrange(0, len(p) - 1)
                if alloc.pages_for(len(p) + s.req.sampling_params.max_new_tokens) > alloc.num_pages:
                    continue  # could never run to its end in this pool
                batcher.add(s)
                added.append(s)
        r = rng.random() if step < 400 else 1.0
        if r < 0.1:  # a control request: the step in flight is read back first
            if inflight is not None:
                read_back_step(inflight)
                inflight = None
            victim = rng.choice(added) if added else None
            if r < 0.05 and victim is not None and victim.status is not Status.FINISHED:  # an abort
                batcher.finish(victim)
            elif 0.05 <= r < 0.08:
                batcher.retract_all()
            elif r >= 0.08:  # a weight update while generation is paused in place
                batcher.invalidate_cache()
        batch = batcher.schedule()
        launched = None
        if batch is not None:
            mark_sample_rows(batch.seqs, batch.entries)
            r = rng.random() if step < 400 else 1.0
            if r < 0.05:  # the launch fails: Scheduler.launch undoes it, reads the step in flight back, aborts
                undo_launch(batch.seqs, batch.entries)
                if inflight is not None:
                    read_back_step(inflight)
                    inflight = None
                for s in batch.seqs:
                    if s.status is not Status.FINISHED:
                        batcher.finish(s)
            else:
                launched = list(zip(batch.seqs, batch.entries))
                if r < 0.1:  # one row refused before the forward (Scheduler.drop_row)
                    s, e = launched.pop(rng.randrange(len(launched)))
                    s.pending -= e.sample
                    s.num_computed = e.start_pos
                    batcher.finish(s)
                forward(launched)
        elif step >= 400:
            assert inflight is not None or not batcher.has_work, (seed, "no progress")
        if inflight is not None:
            read_back_step(inflight)
        inflight = launched
        if step >= 400 and inflight is None and not batcher.has_work:
            break
    assert not batcher.has_work, (seed, "wedged")
    assert [(s.rid, why) for s, why in failed] == [], seed
    assert_accounted(batcher, alloc)
    return sum(s.cached_tokens for s in added)


def test_overlapped_steps_with_shared_prompts_read_only_kv_already_written():
    assert sum(_overlapped_run(seed) > 0 for seed in range(40)) > 30  # prompts were shared


def test_a_running_prompt_is_matched_by_a_request_arriving_while_it_decodes():
    """A sample of the same prompt sent a moment later (its own HTTP request) matches the prompt's pages while
    the first sequence still generates, instead of computing the prompt again."""
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4)
    prompt = list(range(100, 118))
    first = seq(prompt, max_new_tokens=6, rid="first")
    batcher.add(first)
    for _ in range(3):  # the prompt, then two decode steps
        read_back(batcher.schedule(), batcher)
    late = seq(prompt, max_new_tokens=2, rid="late")
    batcher.add(late)
    batch = batcher.schedule()
    assert [(s.rid, e.start_pos) for s, e in zip(batch.seqs, batch.entries)] == [("first", 20), ("late", 16)]
    assert late.cached_tokens == 16 and late.pages[:4] == first.pages[:4]
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def test_prompts_sharing_a_long_head_compute_it_once():
    """Prompts with a common system prompt admitted together: the first computes the head, the others wait a
    step and match it; one arriving later matches it too. A head shorter than FOLLOW_MIN_TOKENS is computed
    again rather than waited for."""
    from hotswap.scheduler.prompt_sharing import FOLLOW_MIN_TOKENS

    batcher, alloc, _ = make_batcher(num_pages=128, page_size=4)
    head = list(range(1000, 1040))  # 40 tokens: 10 pages
    assert len(head) >= FOLLOW_MIN_TOKENS
    prompts = [head + [i, i + 1, i + 2, i + 3, i + 4] for i in range(3)]
    short_head = [head[:8] + [7, 7, 7, 7, 7, 7, 7, 7, 7]]  # shares 2 pages with the others: no wait
    seqs = [seq(p, max_new_tokens=3, rid=f"q{i}") for i, p in enumerate(prompts + short_head)]
    for s in seqs:
        batcher.add(s)
    batch = batcher.schedule()
    assert [s.rid for s in batch.seqs] == ["q0", "q3"]
    read_back(batch, batcher)
    batch = batcher.schedule()
    assert [(s.rid, e.start_pos) for s, e in zip(batch.seqs, batch.entries) if s.rid in ("q1", "q2")] == [("q1", 40), ("q2", 40)]
    later = seq(head + [9, 9, 9], max_new_tokens=2, rid="later")
    batcher.add(later)
    read_back(batch, batcher)
    batch = batcher.schedule()
    assert later in batch.seqs and later.cached_tokens == 40
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert [s.cached_tokens for s in seqs] == [0, 40, 40, 0]
    assert_accounted(batcher, alloc)


def test_prompt_pages_computed_before_a_weight_update_are_never_published():
    batcher, alloc, _ = make_batcher(num_pages=64, page_size=4, chunk=8)
    prompt = list(range(100, 124))
    first = seq(prompt, max_new_tokens=4, rid="first")
    batcher.add(first)
    read_back(batcher.schedule(), batcher)  # the first chunk
    batcher.invalidate_cache()  # the weights changed (a pause in place kept `first` running)
    again = seq(prompt, max_new_tokens=1, rid="again")
    batcher.add(again)
    batch = batcher.schedule()
    assert again in batch.seqs and again.cached_tokens == 0  # neither published nor waited for
    assert batcher.prefix_cache.all_pages() == []
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert_accounted(batcher, alloc)


def test_a_prompt_page_computed_twice_at_once_is_kept_once():
    """Two prompts with a common head too short to wait for, admitted together, both compute it; once the first
    one's pages are in the prefix cache, the second reads the cache's copy and frees its own. Else its own copy
    stays held while the cache's stays pinned under the second's prompt pages: the pool is short by the head,
    and a sequence that fits the pool alone is failed as too big."""
    batcher, alloc, failed = make_batcher(num_pages=16, page_size=4)
    head = list(range(100, 120))  # 20 tokens: 5 pages, fewer than FOLLOW_MIN_TOKENS
    first = seq(head + [1, 2, 3, 4], max_new_tokens=1, rid="first")
    second = seq(head + [5, 6, 7, 8, 9, 10, 11, 12], max_new_tokens=36, rid="second")  # 64 tokens: the whole pool
    batcher.add(first)
    batcher.add(second)
    batch = batcher.schedule()
    assert batch.seqs == [first, second] and alloc.num_used == 13
    read_back(batch, batcher)  # `first` is done
    batch = batcher.schedule()  # both prompts published: `second`'s head is the cache's (the one `first` computed)
    assert second.pages[:5] == batcher.prefix_cache.match(head)
    read_back(batch, batcher)
    run_to_completion(batcher)
    assert failed == [] and len(second.output_ids) == 36  # its 63 computed tokens fill the 16 pages
    assert_accounted(batcher, alloc)


def test_requests_waiting_for_a_long_head_are_not_matched_again_at_every_step():
    """Requests sharing a head that one of them computes in many chunks wait for all of it; each is matched when
    it starts waiting and once the head is in, not at every step (with a 32K-token head and hundreds waiting,
    matching each again per step took the scheduler thread ~0.5 s a step)."""
    batcher, alloc, _ = make_batcher(num_pages=128, page_size=4, chunk=8, token_budget=16)
    head = list(range(1000, 1064))  # 64 tokens: 8 chunks
    seqs = [seq(head + [i] * 6, max_new_tokens=2, rid=f"q{i}") for i in range(4)]
    for s in seqs:
        batcher.add(s)
    matched: list[int] = []
    match = batcher.prefix_cache.match
    batcher.prefix_cache.match = lambda tokens: matched.append(tokens[-1]) or match(tokens)
    steps = run_to_completion(batcher)
    assert steps >= 9 and [s.cached_tokens for s in seqs] == [0, 64, 64, 64]  # the whole head: none computed twice
    assert sorted(matched) == [0] + [1, 1, 2, 2, 3, 3]  # q0 once; q1..q3 twice each
    assert_accounted(batcher, alloc)
