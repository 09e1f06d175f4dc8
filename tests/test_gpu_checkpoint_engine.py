"""checkpoint-engine's real ParameterServer pushing into a CUDA engine through `update_weights_from_ipc`.
Skipped without CUDA or without the `checkpoint_engine` package.

The ParameterServer runs in a spawned process (CUDA IPC cannot open a handle in the process that made it):
world size 1, its own TCP store, NCCL. Its `req_func` hands the socket addresses to this process over a
queue, as SGLang's integration would POST them, and waits for the engine's answer; the engine receives
the push here. Buckets are capped small so the tiny checkpoint crosses both halves of the double buffer.
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback

import pytest
import torch
from trainer_support import checkpoint_tensors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("checkpoint_engine") is None, reason="needs the checkpoint-engine package")]

CTX = mp.get_context("spawn")
BUCKET_BYTES = 192 << 10  # the tiny checkpoint (~550 KB) goes in 4 buckets
UNKNOWN = "model.layers.0.zzz_not_a_parameter.weight"  # the server sorts names: this lands in its third bucket of four


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parameter_server_main(port: int, commands, events, answers) -> None:
    """For each (name, checkpoint path, add_unknown) command: register the tensors, gather metas, update
    (req_func reports ("request", zmq_handles) and waits for the engine's answer), unregister; then report
    ("updated" | "update_failed", {"error", "allocated"}). None ends it."""
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", PS_MAX_BUCKET_SIZE_GB=repr(BUCKET_BYTES / (1 << 30)))
    try:
        from checkpoint_engine.ps import ParameterServer

        ps = ParameterServer(auto_pg=True, master_addr="127.0.0.1", master_port=port)
        while (command := commands.get()) is not None:
            name, path, add_unknown = command
            weights = checkpoint_tensors(path)
            if add_unknown:
                weights[UNKNOWN] = torch.zeros(64)

            def req_func(socket_paths: list[tuple[str, str]]) -> None:
                events.put(("request", dict(socket_paths)))
                answers.get(timeout=300)

            ps.register_checkpoint(name, named_tensors=weights)
            error = None
            try:
                ps.gather_metas(name)
                ps.update(name, req_func)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                ps.unregister_checkpoint(name)
            torch.cuda.synchronize()
            events.put(("update_failed" if error else "updated", {"error": error, "allocated": torch.cuda.memory_allocated()}))
    except BaseException:
        events.put(("error", traceback.format_exc()))
        raise


class ParameterServerProcess:
    def __init__(self):
        self.commands, self.events, self.answers = CTX.Queue(), CTX.Queue(), CTX.Queue()
        self.process = CTX.Process(target=parameter_server_main, args=(_free_port(), self.commands, self.events, self.answers), daemon=True)
        self.process.start()

    def expect(self, kind: str, timeout: float = 180.0):
        try:
            got, payload = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {kind!r} from the parameter server within {timeout} s (alive: {self.process.is_alive()})") from None
        assert got == kind, f"expected {kind!r} from the parameter server, got {got!r}: {payload}"
        return payload

    def push(self, engine, name: str, path, add_unknown: bool = False, weight_version: str | None = None):
        """One ParameterServer.update into `engine`: (engine output, server report)."""
        self.commands.put((name, str(path), add_unknown))
        handles = self.expect("request")
        out = engine.update_weights_from_ipc(handles, weight_version=weight_version)
        self.answers.put(out.success)
        report = self.expect("update_failed" if add_unknown else "updated")
        return out, report

    def close(self) -> None:
        self.commands.put(None)
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


def _ipc_mappings_alive() -> int:
    """Storages this process still maps from other processes (torch's cache of opened IPC handles)."""
    from torch.multiprocessing.reductions import shared_cache

    return sum(not ref.expired() for ref in list(shared_cache.values()))


def test_real_messages_decode():
    """What the installed package and torch really pickle: reduce_tensor of a CUDA buffer, a bucket from
    `_to_named_tensor` (pydantic ParameterMeta: torch.Size shapes)."""
    from checkpoint_engine.data_types import ParameterMeta
    from checkpoint_engine.ps import _to_named_tensor
    from torch.multiprocessing.reductions import reduce_tensor

    from hotswap.weights.checkpoint_engine_payloads import decode, parse_bucket, parse_ipc_handle

    buffer = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    handle = parse_ipc_handle(decode(pickle.dumps(reduce_tensor(buffer), protocol=pickle.DEFAULT_PROTOCOL)))
    assert handle.view.numel == 1 << 20 and handle.storage_size_bytes >= 1 << 20
    metas = [ParameterMeta(name="w", dtype=torch.bfloat16, shape=torch.Size([16, 8]), aligned_size=256),
             ParameterMeta(name="b", dtype=torch.float32, shape=torch.Size([5]), aligned_size=256)]
    entries = parse_bucket(decode(pickle.dumps(_to_named_tensor(metas, 512), protocol=pickle.DEFAULT_PROTOCOL)), 1 << 20)
    assert [(e.name, e.dtype, e.shape, e.offset) for e in entries] == [("w", torch.bfloat16, (16, 8), 512), ("b", torch.float32, (5,), 768)]


def test_parameter_server_pushes_into_the_engine(tiny_qwen3, tiny_qwen3_v2):
    from hf_reference import greedy_ids, reference_ids

    from hotswap import Engine
    from hotswap.wire.checksum import state_dict_manifest

    ps = ParameterServerProcess()
    try:
        with Engine(str(tiny_qwen3), device="cuda", dtype="float32", weight_session_timeout_s=120) as engine:
            ptrs = [p.data_ptr() for p in engine.model_runner.model.parameters()]
            memory = []  # after each good update: (engine allocated, server allocated, device used)
            plan = [tiny_qwen3_v2, tiny_qwen3, tiny_qwen3_v2, tiny_qwen3, tiny_qwen3_v2]
            for i, path in enumerate(plan):
                out, report = ps.push(engine, f"step-{i}", path, weight_version=f"ce-{i}")
                assert out.success, out.message
                assert out.weight_version == f"ce-{i}" and out.extra.buckets >= 3, out
                weights = checkpoint_tensors(path)
                assert out.num_tensors == len(weights)
                assert engine.check_weights("checksum", expected=state_dict_manifest(weights)).success
                assert greedy_ids(engine) == reference_ids(path)
                assert [p.data_ptr() for p in engine.model_runner.model.parameters()] == ptrs  # CUDA graphs stay valid
                gc.collect()
                assert _ipc_mappings_alive() == 0, "the engine still maps the server's buffer"
                free, total = torch.cuda.mem_get_info()
                memory.append((torch.cuda.memory_allocated(), report["allocated"], total - free))
                if i == 1:  # a bad push between good ones: buckets 1-2 land, 3 is refused, the server aborts, the engine rolls back
                    before = engine.check_weights("checksum").digest
                    bad, report = ps.push(engine, "bad", tiny_qwen3_v2, add_unknown=True)
                    assert not bad.success and UNKNOWN in bad.message and bad.rolled_back, bad.message
                    assert "Failed to update weights due to remote errors" in report["error"], report
                    assert engine.check_weights("checksum").digest == before
                    assert greedy_ids(engine) == reference_ids(path)
            engine_alloc, server_alloc, used = zip(*memory)
            assert len(set(engine_alloc[1:])) == 1 and len(set(server_alloc[1:])) == 1, memory
            assert used[-1] - used[1] < 64 << 20, f"device memory grew by {(used[-1] - used[1]) >> 20} MiB over {len(plan) - 2} updates: {memory}"
    finally:
        ps.close()
