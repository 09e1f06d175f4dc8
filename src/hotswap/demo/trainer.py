"""The demo's trainer process: its own float32 copy of the policy in PyTorch, a GRPO-style update from
the engine's rollouts, and a weight push back into the engine after every step.

It runs in a `spawn` child. Messages on its pipe (from the main process, which holds the engine):
- `("push", version)`: push the current weights (the first sync, before any training);
- `("train", batch, version)`: one policy-gradient step on `batch`, then push as `version`;
- `("stop",)`: leave the weights group and exit.
It answers each with `("pushed", stats)` and, in between, drives the engine with `PipeEngineHandle`
calls (begin/update/end weight update, check_weights) that the main process serves.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import torch

SYNC_KINDS = ("distributed", "ipc", "disk")


@dataclass(slots=True)
class TrainerConfig:
    model_path: str
    sync: str = "distributed"  # distributed | ipc | disk
    device: str = "cpu"  # the trainer's device
    push_dtype: str = "float32"  # the engine's dtype: weights are cast to it on the wire and for checksums
    lr: float = 2e-3
    clip_eps: float = 0.2
    micro_batch: int = 0  # sequences per forward/backward (0: the whole batch at once)
    seed: int = 0
    backend: str | None = None  # distributed: "gloo" | "nccl" (None: nccl between two GPUs, else gloo)
    bucket_bytes: int = 64 << 20
    disk_dir: str | None = None  # disk: where checkpoints are written (None: a temporary folder)
    verify_every: int = 1  # check the engine's checksums every N pushes (0: never)
    num_threads: int = 0  # torch threads in the trainer (0: torch's default)


@dataclass(slots=True)
class Batch:
    """One step's rollouts, flattened: sample i answers prompt `group[i]`; groups are contiguous."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # the engine's logprob of each completion token, under the weights that sampled it
    rewards: list[float]
    group: list[int]


def group_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Group-relative baseline: each reward minus the mean reward of its prompt's group (no std scaling,
    so all-equal groups contribute nothing and rare successes are not blown up)."""
    num = int(group.max()) + 1
    sums = torch.zeros(num, dtype=rewards.dtype).index_add_(0, group, rewards)
    counts = torch.zeros(num, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    return rewards - (sums / counts)[group]


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        device: torch.device) -> list[torch.Tensor]:
    """The trainer's logprob of every completion token (a list of 1-D tensors), from one padded forward.
    Only the hidden states at completion positions go through the LM head (vocabularies can be large)."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (s, p, c) in enumerate(zip(seqs, prompt_ids, completion_ids)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        rows += [i] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))  # the position that predicts each completion token
        targets += c
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.get_output_embeddings()(picked).float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
    return list(lp.split([len(c) for c in completion_ids]))


def policy_gradient_step(model, optimizer, batch: Batch, *, clip_eps: float, pad_id: int, device: torch.device,
                         micro_batch: int = 0) -> dict:
    """One PPO-clipped policy-gradient step (GRPO: group-relative advantages, token-level mean).

    The importance ratio is trainer/engine probability of each sampled token: ~1 on-policy, it corrects the
    small numeric mismatch between the engine's kernels (and dtype) and the trainer's."""
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    adv = group_advantages(rewards, torch.tensor(batch.group))
    n = len(batch.rewards)
    num_tokens = sum(len(c) for c in batch.completion_ids)
    step = micro_batch or n
    optimizer.zero_grad(set_to_none=True)
    total, clipped, max_dev, sum_dev, loss_sum = 0, 0, 0.0, 0.0, 0.0
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        new = completion_logprobs(model, batch.prompt_ids[sl], batch.completion_ids[sl], pad_id, device)
        new_flat = torch.cat(new)
        old_flat = torch.tensor([x for lps in batch.logprobs[sl] for x in lps], dtype=torch.float32, device=device)
        adv_flat = torch.cat([adv[i].repeat(len(c)) for i, c in zip(range(sl.start, sl.stop), batch.completion_ids[sl])]).to(device)
        log_ratio = new_flat - old_flat
        ratio = torch.exp(log_ratio)
        objective = torch.minimum(ratio * adv_flat, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv_flat)
        loss = -objective.sum() / num_tokens
        loss.backward()
        with torch.no_grad():
            dev = log_ratio.abs()
            max_dev = max(max_dev, float(dev.max()))
            sum_dev += float(dev.sum())
            clipped += int(((ratio - 1).abs() > clip_eps).sum())
            total += new_flat.numel()
            loss_sum += float(loss)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    return {"loss": loss_sum, "grad_norm": grad_norm, "num_tokens": num_tokens,
            "logprob_diff_max": max_dev, "logprob_diff_mean": sum_dev / max(1, total), "clip_frac": clipped / max(1, total)}


def make_pusher(cfg: TrainerConfig, engine, push_dtype: torch.dtype, device: torch.device):
    """The `hotswap.trainer` pusher for `cfg.sync`, driving `engine` (any EngineHandle)."""
    from hotswap.trainer import DiskWeightPusher, DistributedWeightPusher, IPCWeightPusher

    if cfg.sync == "distributed":
        backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
        return DistributedWeightPusher(engine, master_address="127.0.0.1", backend=backend, bucket_bytes=cfg.bucket_bytes,
                                       dtype=push_dtype, device=device if backend == "nccl" else torch.device("cpu"),
                                       timeout_s=120.0)
    if cfg.sync == "ipc":
        return IPCWeightPusher(engine, bucket_bytes=cfg.bucket_bytes, dtype=push_dtype)
    if cfg.sync == "disk":
        return DiskWeightPusher(engine, template_dir=cfg.model_path, root_dir=cfg.disk_dir, dtype=push_dtype)
    raise ValueError(f"unknown sync {cfg.sync!r}; choose one of {SYNC_KINDS}")


def push_and_verify(pusher, engine, model, version: str, push_dtype: torch.dtype, verify: bool) -> dict:
    from hotswap.trainer import verify_engine_weights

    result = pusher.push(model.state_dict(), weight_version=version)
    out = {"pushed_version": result.weight_version, "sync_s": result.elapsed_s, "transfer_s": result.transfer_s,
           "num_bytes": result.num_bytes, "num_tensors": result.num_tensors, "num_buckets": result.num_buckets,
           "engine_update_s": result.engine_results[0].get("elapsed_s") if result.engine_results else None,
           "checksum_ok": None, "checksum_digest": None, "verify_s": 0.0}
    if verify:
        t0 = time.perf_counter()
        check = verify_engine_weights(engine, model.state_dict(), dtype=push_dtype)
        out.update(checksum_ok=check.success, checksum_digest=check.get("digest"), verify_s=time.perf_counter() - t0)
        if not check.success:
            out["checksum_message"] = check.message
    return out


def trainer_main(conn: Connection, cfg: TrainerConfig) -> None:
    """Entry point of the trainer process."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from hotswap.demo.bridge import PipeEngineHandle
        from hotswap.wire.dtypes import dtype_from_name

        hf_logging.disable_progress_bar()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        device = torch.device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32).to(device)
        model.train()
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        push_dtype = dtype_from_name(cfg.push_dtype)
        engine = PipeEngineHandle(conn)
        pusher = make_pusher(cfg, engine, push_dtype, device)
        t0 = time.perf_counter()
        if cfg.sync == "distributed":
            pusher.connect()  # the engine joins the group through the pipe while this process hosts the rendezvous
        conn.send(("ready", {"config": asdict(cfg), "connect_s": time.perf_counter() - t0,
                             "num_parameters": sum(p.numel() for p in model.parameters())}))
        pushes = 0
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            stats = {}
            if msg[0] == "train":
                _, batch, version = msg
                t0 = time.perf_counter()
                stats = policy_gradient_step(model, optimizer, batch, clip_eps=cfg.clip_eps, pad_id=pad_id, device=device,
                                             micro_batch=cfg.micro_batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stats["train_s"] = time.perf_counter() - t0
            else:
                _, version = msg
            verify = bool(cfg.verify_every) and pushes % cfg.verify_every == 0
            stats.update(push_and_verify(pusher, engine, model, version, push_dtype, verify))
            pushes += 1
            conn.send(("pushed", stats))
        pusher.close()  # distributed: destroys the group on the engine (through the pipe) and here
        conn.send(("bye",))
    except BaseException:
        # no clean-up through the pipe here: the main process stops serving calls once it reads the error
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
