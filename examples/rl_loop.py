"""A minimal RL post-training loop against a live hotswap engine: copy it into your own trainer.

    PYTHONPATH=src python3 examples/rl_loop.py                       # tiny built-in model, CPU, ~15 s
    PYTHONPATH=src python3 examples/rl_loop.py --sync disk --steps 80
    PYTHONPATH=src python3 examples/rl_loop.py --model-path /path/to/hf-checkpoint --device cuda

Two processes:
- this one serves the policy with `hotswap.Engine` and samples rollouts (with per-token logprobs);
- a trainer process (spawned) holds a float32 copy of the same checkpoint in PyTorch, takes one GRPO step
  per batch of rollouts and pushes its weights back into the live engine with `hotswap.trainer`.

The trainer reaches the engine through an `EngineHandle`. Here that is `PipeEngineHandle`, which forwards
each call over a multiprocessing pipe to this process; with `hotswap serve` running elsewhere you would
use `HttpEngineClient("http://host:port")` instead and nothing else changes.

`hotswap demo` is this loop with a progress table, a JSON log and a plot (src/hotswap/demo/).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time

import torch

# ---------------------------------------------------------------------------------------------------
# 1. The task: prompts like "4812=", reward 1 when the completion starts with the last digit ("2").
# ---------------------------------------------------------------------------------------------------


def make_problems(rng: random.Random, n: int) -> list[tuple[str, str]]:
    problems = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(4)]
        problems.append(("".join(map(str, digits)) + "=", str(digits[-1])))
    return problems


def reward(completion: str, answer: str) -> float:
    return 1.0 if completion.lstrip()[:1] == answer else 0.0


# ---------------------------------------------------------------------------------------------------
# 2. The trainer: GRPO with a PPO-clipped importance ratio against the engine's logprobs.
# ---------------------------------------------------------------------------------------------------


def grpo_loss(model, prompts, completions, engine_logprobs, rewards, group_size: int, clip_eps: float = 0.2):
    """prompts/completions: token id lists, one per sample, G consecutive samples per prompt."""
    # group-relative advantage: reward minus the mean reward of the same prompt's G samples
    r = torch.tensor(rewards).view(-1, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)).view(-1).tolist()
    # one padded forward over prompt + completion; pick the positions that predict completion tokens
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    new, old, a = [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
        new.append(logp[i, pos, torch.tensor(c, device=device)])
        old += engine_logprobs[i]
        a += [adv[i]] * len(c)
    new = torch.cat(new)
    old = torch.tensor(old, device=device)
    a = torch.tensor(a, device=device)
    ratio = torch.exp(new - old)  # ~1 on-policy: it absorbs the engine/trainer numeric mismatch
    return -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a).mean()


def trainer_process(conn, model_path: str, sync: str, engine_dtype: str, lr: float, group_size: int):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from hotswap.demo.bridge import PipeEngineHandle
    from hotswap.trainer import DiskWeightPusher, DistributedWeightPusher, IPCWeightPusher, verify_engine_weights

    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    engine = PipeEngineHandle(conn)  # or HttpEngineClient("http://host:port")
    dtype = getattr(torch, engine_dtype)  # pushes are cast to the engine's dtype
    if sync == "distributed":
        pusher = DistributedWeightPusher(engine, master_address="127.0.0.1", backend="gloo", dtype=dtype)
        pusher.connect()  # the engine joins this process's torch.distributed group
    elif sync == "ipc":
        pusher = IPCWeightPusher(engine, dtype=dtype)  # shared memory (CPU) or CUDA IPC handles
    else:
        pusher = DiskWeightPusher(engine, template_dir=model_path, dtype=dtype)  # a checkpoint in a temp folder

    def push(version: str) -> dict:
        res = pusher.push(model.state_dict(), weight_version=version)  # one atomic weight-update session
        check = verify_engine_weights(engine, model.state_dict(), dtype=dtype)  # sha256 of every tensor, both sides
        return {"version": res.weight_version, "sync_s": res.elapsed_s, "checksum_ok": check.success}

    conn.send(("pushed", push("step-0")))  # the first sync: the engine takes the trainer's weights
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, batch, version = msg
        loss = grpo_loss(model, *batch, group_size=group_size)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        conn.send(("pushed", push(version)))
    pusher.close()
    conn.send(("bye",))


# ---------------------------------------------------------------------------------------------------
# 3. The engine side: rollouts, then serve the trainer's engine calls while it trains and pushes.
# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None, help="a HF checkpoint folder (default: a tiny digit model built locally)")
    parser.add_argument("--sync", choices=("distributed", "ipc", "disk"), default="distributed")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from hotswap import Engine
    from hotswap.demo.bridge import serve_calls
    from hotswap.demo.policy import cached_digit_model

    model_path = args.model_path or str(cached_digit_model("/tmp/hotswap-example"))
    torch.set_num_threads(1)
    engine = Engine(model_path, device=args.device, seed=0, max_running_requests=512, num_pages=4096)
    engine_dtype = str(engine.model_config.torch_dtype).removeprefix("torch.")
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    trainer = ctx.Process(target=trainer_process, args=(child, model_path, args.sync, engine_dtype, args.lr, args.group_size), daemon=True)
    trainer.start()
    child.close()

    rng = random.Random(0)
    _, pushed = serve_calls(conn, engine, until="pushed")  # the engine answers the trainer's calls until it reports
    version = pushed["version"]
    for step in range(args.steps + 1):
        problems = make_problems(rng, args.prompts)
        prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p, _ in problems]
        outs = engine.generate(input_ids=prompts, return_logprob=True,
                               sampling_params={"n": args.group_size, "temperature": 1.0, "max_new_tokens": 1})
        # every rollout must come from the weights just pushed
        assert all(o["meta_info"]["weight_version"] == version for o in outs), "stale rollouts"
        j = [i // args.group_size for i in range(len(outs))]
        rewards = [reward(o["text"], problems[j[i]][1]) for i, o in enumerate(outs)]
        mean_reward = sum(rewards) / len(rewards)
        if step == args.steps:
            print(f"step {step:3d}  rollouts@{version:9s} reward {mean_reward:.3f}  (final)")
            break
        batch = ([prompts[k] for k in j], [o["output_ids"] for o in outs],
                 [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs], rewards)
        t0 = time.perf_counter()
        conn.send(("train", batch, f"step-{step + 1}"))
        _, pushed = serve_calls(conn, engine, until="pushed")
        assert pushed["checksum_ok"], "the engine does not hold the trainer's weights"
        print(f"step {step:3d}  rollouts@{version:9s} reward {mean_reward:.3f}  "
              f"push {pushed['sync_s'] * 1000:6.1f} ms -> {pushed['version']} (checksums ok)  step {time.perf_counter() - t0:.2f} s")
        version = pushed["version"]
    conn.send(("stop",))
    serve_calls(conn, engine, until="bye")
    trainer.join()
    engine.shutdown()


if __name__ == "__main__":
    main()
