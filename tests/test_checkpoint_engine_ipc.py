"""`update_weights_from_ipc`, the receiving end of MoonshotAI's checkpoint-engine.

The restricted decoder against the messages a real ParameterServer pickles (and against malicious ones),
then the whole exchange on the CPU: a fake ParameterServer thread speaks ps.py's side of the protocol over
a real ZMQ ipc socket, with a CPU uint8 double buffer standing in for the CUDA one (the engine's
`BufferSource` maps the fake handle to it). The real ParameterServer runs in tests/test_gpu_checkpoint_engine.py.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from hf_reference import greedy_ids, reference_ids
from torch.multiprocessing.reductions import rebuild_cuda_tensor
from trainer_support import checkpoint_tensors

from hotswap import Engine
from hotswap.weights.checkpoint_engine_payloads import PayloadError, decode, parse_bucket, parse_ipc_handle
from hotswap.weights.checkpoint_engine_receiver import BufferSource
from hotswap.wire.checksum import state_dict_manifest

zmq = pytest.importorskip("zmq")  # checkpoint-engine speaks ZeroMQ

DEVICE_KEY = "GPU-00000000-fake-0000-0000-000000000000"
ALIGN = 256  # checkpoint-engine aligns every tensor in its buffer to 256 bytes
TIMEOUT_S = 1.5  # the engine's weight_session_timeout_s here: how long it waits for a vanished server
SHARED: dict[bytes, torch.Tensor] = {}  # fake IPC handle -> the CPU buffer it stands for


def ipc_handle(key: bytes, nbytes: int) -> tuple:
    """What `reduce_tensor` returns for a 1-D uint8 CUDA tensor of `nbytes`, with `key` as its IPC handle."""
    return (rebuild_cuda_tensor, (torch.Tensor, torch.Size([nbytes]), (1,), 0, torch.storage.TypedStorage, torch.uint8, 0, key, nbytes, 0,
                                  False, b"/torch_1234_5678_0", 0, b"\x01" * 64, True))


def open_shared(handle, device: torch.device) -> torch.Tensor:
    start = handle.view.storage_offset
    return SHARED[handle.storage_handle][start : start + handle.view.numel]


CPU_SOURCE = BufferSource(device_key=lambda device: DEVICE_KEY, open=open_shared)


@dataclass
class FakeParameterServer:
    """checkpoint-engine's `ParameterServer._update_per_bucket` as seen from the engine: the buffer handle,
    then per bucket (filled into alternate halves of a double buffer) the engine's answer to the previous
    message is read before the bucket's metadata goes out; an error answer, or `abort_at` (another worker
    failed), makes it send a RuntimeError and stop; the answer to the last bucket is read and ignored;
    then None twice. `vanish_after`: close the socket after sending that bucket (the server died). `tamper`
    edits a bucket's metadata (index, list of dicts) before it goes out: a server whose metadata lies."""

    buckets: list[list[tuple[str, torch.Tensor]]]
    abort_at: int | None = None
    vanish_after: int | None = None
    tamper: Callable[[int, list[dict]], None] | None = None
    abort_with: Exception | None = None  # what the abort at `abort_at` sends (ps.py's RuntimeError by default)
    final_nones: int = 2  # checkpoint-engine >= 0.4.0 ends with two Nones (release, then done); < 0.4.0 with one
    answers: list[bytes] = field(default_factory=list)
    outcome: str = ""

    def update(self, req_func: Callable[[list[tuple[str, str]]], None]) -> None:
        half = max(ALIGN, *(sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for _, t in b) for b in self.buckets))
        key = uuid.uuid4().bytes
        SHARED[key] = buffer = torch.zeros(2 * half, dtype=torch.uint8)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a broken engine fails the test instead of hanging it
        address = f"ipc://@hotswap-test-ps-{uuid.uuid4().hex}.sock"
        sock.bind(address)
        thread = threading.Thread(target=req_func, args=([(DEVICE_KEY, address)],))
        thread.start()
        try:
            self.outcome = self._drive(sock, buffer, half, key)
        finally:
            thread.join()
            sock.close(linger=0)
            ctx.term()
            del SHARED[key]

    def _drive(self, sock, buffer: torch.Tensor, half: int, key: bytes) -> str:
        sock.send_pyobj(ipc_handle(key, buffer.numel()))
        for i, bucket in enumerate(self.buckets):
            metas, offset = [], i % 2 * half
            for name, t in bucket:
                nbytes = t.numel() * t.element_size()
                buffer[offset : offset + nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
                metas.append({"name": name, "dtype": t.dtype, "shape": t.shape, "offset": offset})
                offset += -(-nbytes // ALIGN) * ALIGN
            if self.tamper is not None:
                self.tamper(i, metas)
            self.answers.append(sock.recv())
            if self.answers[-1] != b"" or i == self.abort_at:
                sock.send_pyobj(self.abort_with if self.abort_with is not None and i == self.abort_at
                                else RuntimeError("Some workers failed to update weights"))
                return "aborted"
            sock.send_pyobj(metas)
            if i == self.vanish_after:
                return "vanished"
        self.answers.append(sock.recv())
        for _ in range(self.final_nones):
            sock.send_pyobj(None)
            sock.recv()
        return "done"


def split(weights: dict[str, torch.Tensor], n: int) -> list[list[tuple[str, torch.Tensor]]]:
    items = sorted(weights.items())
    size = -(-len(items) // n)
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_session_timeout_s=TIMEOUT_S, check_weights_finite=True) as eng:
        eng.scheduler.weight_updater.ipc_source = CPU_SOURCE
        yield eng


def push(engine: Engine, ps: FakeParameterServer, **kw):
    results = []
    ps.update(lambda paths: results.append(engine.update_weights_from_ipc(dict(paths), **kw)))
    return results[0]


# ---- the restricted decoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(3, pickle.HIGHEST_PROTOCOL + 1))  # send_pyobj: pickle.DEFAULT_PROTOCOL (4 or 5)
def test_decoder_accepts_what_a_parameter_server_sends(protocol):
    assert len(ipc_handle(b"k", 8)[1]) == len(inspect.signature(rebuild_cuda_tensor).parameters)  # reduce_tensor's shape
    handle = parse_ipc_handle(decode(pickle.dumps(ipc_handle(b"k" * 64, 4096), protocol=protocol)))
    assert (handle.view.numel, handle.storage_handle, handle.storage_size_bytes, handle.event_sync_required) == (4096, b"k" * 64, 4096, True)
    bucket = [{"name": f"w{i}", "dtype": dt, "shape": torch.Size([2, 3]), "offset": 256 * i}
              for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])]
    entries = parse_bucket(decode(pickle.dumps(bucket, protocol=protocol)), 4096)
    assert [(e.name, e.dtype, e.shape, e.offset) for e in entries] == [(b["name"], b["dtype"], (2, 3), b["offset"]) for b in bucket]
    err = decode(pickle.dumps(RuntimeError("Some workers failed to update weights"), protocol=protocol))
    assert type(err) is RuntimeError and str(err) == "Some workers failed to update weights"
    assert decode(pickle.dumps(None, protocol=protocol)) is None


class _Gadget:
    """Pickles as a call of `fn(*args)`: what an attacker sends."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_decoder_refuses_malicious_pickles(tmp_path):
    marker = tmp_path / "pwned"
    attacks = [
        (_Gadget(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        (_Gadget(subprocess.check_output, ["touch", str(marker)]), "subprocess.check_output"),
        (_Gadget(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        ([{"name": "w", "dtype": _Gadget(__import__, "os"), "shape": [1], "offset": 0}], "builtins.__import__"),
        (_Gadget(torch.storage._load_from_bytes, b"x"), "torch.storage._load_from_bytes"),  # torch.load in disguise
    ]
    for obj, name in attacks:
        with pytest.raises(PayloadError, match=re.escape(f"refused to unpickle global {name}")):
            decode(pickle.dumps(obj))
    with pytest.raises(PayloadError, match="not callable"):  # the rebuild function is named, never run
        decode(pickle.dumps(_Gadget(rebuild_cuda_tensor, *ipc_handle(b"k", 8)[1])))
    with pytest.raises(PayloadError, match="undecodable"):
        decode(b"\x80\x04not a pickle")
    assert not marker.exists()


def test_handle_and_bucket_checks_name_what_is_wrong():
    def handle_with(**changes):
        args = list(ipc_handle(b"k", 64)[1])
        for index, value in changes.items():
            args[int(index.removeprefix("a"))] = value
        return decode(pickle.dumps((rebuild_cuda_tensor, tuple(args))))

    for changes, needle in [({"a5": torch.float32}, "must be uint8"), ({"a1": torch.Size([8, 8])}, "1-D"),
                            ({"a0": torch.storage.TypedStorage}, "tensor class"), ({"a8": 32}, "run past the storage")]:
        with pytest.raises(PayloadError, match=needle):
            parse_ipc_handle(handle_with(**changes))
    with pytest.raises(PayloadError, match="expected the buffer handle"):
        parse_ipc_handle([{"name": "w"}])
    for item, needle in [({"name": "w", "dtype": "float32", "shape": [2], "offset": 0}, "torch.dtype"),
                         ({"name": "w", "dtype": torch.float32, "shape": [2], "offset": 2}, "multiple of 4"),
                         ({"name": "w", "dtype": torch.float32, "shape": [64], "offset": 0}, "run past"),
                         ({"name": "w", "dtype": torch.float32, "shape": [-1], "offset": 0}, "non-negative")]:
        with pytest.raises(PayloadError, match=needle):
            parse_bucket([item], 128)


# ---- the exchange, end to end ---------------------------------------------------------------------------


def test_push_in_three_buckets_then_back(engine, tiny_qwen3, tiny_qwen3_v2):
    ptrs = {n: p.data_ptr() for n, p in engine.model_runner.model.named_parameters()}
    new = checkpoint_tensors(tiny_qwen3_v2)
    ps = FakeParameterServer(split(new, 3))
    res = push(engine, ps, weight_version="ce-1")
    assert res.success, res.message
    assert ps.outcome == "done" and ps.answers == [b""] * 4
    assert res.weight_version == "ce-1" and res.num_tensors == len(new) and res.extra.buckets == 3
    assert res.num_bytes == sum(t.numel() * t.element_size() for t in new.values())
    assert engine.check_weights("checksum", expected=state_dict_manifest(new)).success
    assert greedy_ids(engine) == reference_ids(tiny_qwen3_v2)
    assert {n: p.data_ptr() for n, p in engine.model_runner.model.named_parameters()} == ptrs
    old = checkpoint_tensors(tiny_qwen3)
    res = push(engine, FakeParameterServer(split(old, 2)))
    assert res.success and engine.check_weights("checksum", expected=state_dict_manifest(old)).success
    assert greedy_ids(engine) == reference_ids(tiny_qwen3)


def test_push_inside_a_session_is_undone_by_its_abort(engine, tiny_qwen3_v2):
    before = engine.check_weights("checksum").digest
    assert engine.begin_weight_update().success
    res = push(engine, FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 3)))
    assert res.success and "inside the open session" in res.message
    assert engine.end_weight_update(abort=True).rolled_back
    assert engine.check_weights("checksum").digest == before


def _fails_and_changes_nothing(engine, ps: FakeParameterServer):
    before, outputs, version = engine.check_weights("checksum").digest, greedy_ids(engine), engine.weight_version
    res = push(engine, ps)
    assert not res.success
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == outputs and engine.weight_version == version
    return res


@pytest.mark.parametrize("fault, needle", [("unknown", "unknown parameter"), ("shape", "shape mismatch"), ("nan", "NaN")])
def test_bad_second_bucket_rolls_back_the_first(engine, tiny_qwen3_v2, fault, needle):
    buckets = split(checkpoint_tensors(tiny_qwen3_v2), 3)
    name, t = buckets[1][0]
    buckets[1][0] = {"unknown": ("model.layers.0.mlp.nope.weight", t), "shape": (name, t.reshape(-1)),
                     "nan": (name, torch.full_like(t, float("nan")))}[fault]
    ps = FakeParameterServer(buckets)
    res = _fails_and_changes_nothing(engine, ps)
    assert needle in res.message and "bucket 2" in res.message
    assert ps.answers[:2] == [b"", b""] and res.rolled_back  # bucket 1 was loaded, then restored
    assert ps.outcome == "aborted" and needle in ps.answers[2].decode()  # the server heard why, and stopped


def test_bad_last_bucket_still_fails_though_the_server_ignores_the_answer(engine, tiny_qwen3_v2):
    buckets = split(checkpoint_tensors(tiny_qwen3_v2), 3)
    buckets[2][0] = ("model.layers.0.mlp.nope.weight", buckets[2][0][1])
    ps = FakeParameterServer(buckets)
    res = _fails_and_changes_nothing(engine, ps)
    assert "bucket 3: unknown parameter" in res.message and res.rolled_back
    assert ps.outcome == "done"


def test_server_abort_rolls_back(engine, tiny_qwen3_v2):
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 3), abort_at=2)
    res = _fails_and_changes_nothing(engine, ps)
    assert "aborted the update: RuntimeError: Some workers failed to update weights" in res.message
    assert ps.answers == [b"", b"", b""] and res.rolled_back  # buckets 1 and 2 were loaded, then restored


def test_an_abort_from_the_wire_is_quoted_cut_short(engine, tiny_qwen3_v2):
    """ps.py's abort is an exception object from the wire: str() of one whose arg is a list sharing a sublist
    40 levels deep is 2**40 items long (a 300-byte pickle: here 24, 2**24, which still fails at once unpatched);
    the failure must quote it cut short, at once."""
    bomb: list = []
    for _ in range(24):
        bomb = [bomb, bomb]
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 3), abort_at=1, abort_with=RuntimeError(bomb))
    res = _fails_and_changes_nothing(engine, ps)
    assert "aborted the update: RuntimeError: ([[[" in res.message and len(res.message) < 1000 and res.rolled_back
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 3), abort_at=1, abort_with=ValueError("x" * 100_000))
    res = _fails_and_changes_nothing(engine, ps)
    assert "aborted the update: ValueError: xxx" in res.message and len(res.message) < 1000


def test_a_server_older_than_0_4_is_named_when_its_push_ends_with_one_none(engine, tiny_qwen3_v2):
    """checkpoint-engine < 0.4.0 (ps.py: recv; send_pyobj(None); recv) ends with one None; >= 0.4.0 (#84) sends
    a second after releasing its buffer. The timeout waiting for that second None says so, not just "died"."""
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 2), final_nones=1)
    res = _fails_and_changes_nothing(engine, ps)
    assert "died or stalled" in res.message and "checkpoint-engine >= 0.4.0" in res.message and res.rolled_back


def test_server_that_vanishes_times_out_and_the_engine_serves_on(engine, tiny_qwen3_v2):
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 3), vanish_after=0)
    res = _fails_and_changes_nothing(engine, ps)
    assert f"within {TIMEOUT_S:g} s" in res.message and "died or stalled" in res.message and res.rolled_back
    assert engine.get_load().success


def test_refusals_before_the_exchange(engine, tiny_qwen3_v2):
    res = engine.update_weights_from_ipc({"GPU-other": "ipc://@nowhere.sock"})
    assert not res.success and DEVICE_KEY in res.message and "GPU-other" in res.message
    assert not engine.update_weights_from_ipc({DEVICE_KEY: "http://x"}).success
    # refused while memory is released, yet the server is answered (it aborts instead of waiting for a peer)
    assert engine.release_memory_occupation().success
    ps = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 2))
    res = push(engine, ps)
    assert engine.resume_memory_occupation().success
    assert not res.success and "released" in res.message
    assert ps.outcome == "aborted" and "released" in ps.answers[0].decode()


def test_http_route(engine, tiny_qwen3, tiny_qwen3_v2):
    """SGLang's route and body, posted the way checkpoint-engine's SGLang integration posts it."""
    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    srv = ServerThread(create_app(engine)).start()
    replies = []

    def req_func(socket_paths):
        r = httpx.post(f"{srv.url}/update_weights_from_ipc", json={"zmq_handles": dict(socket_paths), "flush_cache": True,
                                                                    "weight_version": "http-1"}, timeout=60)
        replies.append((r.status_code, r.json()))

    try:
        new = checkpoint_tensors(tiny_qwen3_v2)
        FakeParameterServer(split(new, 2)).update(req_func)
        assert replies[0][0] == 200 and replies[0][1]["success"] is True, replies
        assert replies[0][1]["weight_version"] == "http-1" and isinstance(replies[0][1]["message"], str)
        assert engine.check_weights("checksum", expected=state_dict_manifest(new)).success
        r = httpx.post(f"{srv.url}/update_weights_from_ipc", json={"zmq_handles": {"GPU-other": "ipc://@x"}}, timeout=60)
        assert r.status_code == 400 and r.json()["success"] is False and "GPU-other" in r.json()["message"]
        assert httpx.post(f"{srv.url}/update_weights_from_ipc", json={"zmq_handles": "nope"}, timeout=60).status_code == 400
        old = checkpoint_tensors(tiny_qwen3)
        FakeParameterServer(split(old, 2)).update(req_func)
        assert replies[1][1]["success"] is True
    finally:
        srv.stop()
