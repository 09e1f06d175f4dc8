"""hotswap.trainer pieces that need no second process: buckets, results, the disk transport, aborts."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future

import pytest
import torch
from trainer_support import checkpoint_tensors

from hotswap import Engine
from hotswap.protocol import ControlOutput, WeightUpdateExtra, WeightUpdateOutput
from hotswap.trainer import (
    BucketMetadata,
    DiskWeightPusher,
    DistributedWeightPusher,
    EngineResult,
    IPCWeightPusher,
    WeightPushError,
    flatten_bucket,
    iter_buckets,
    iter_named_tensors,
    save_hf_checkpoint,
    state_dict_manifest,
    verify_engine_weights,
)
from hotswap.trainer.client import EngineConnectionError
from hotswap.trainer.push import call_result, wait_result
from hotswap.weights.distributed_receiver import BucketMeta, bucket_layout


@pytest.fixture
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        yield eng


def test_trainer_package_imports_only_the_wire_package():
    code = ("import sys, hotswap.trainer; bad = [m for m in sys.modules if m.startswith(('transformers', 'hotswap.')) and not "
            "m.startswith(('hotswap.trainer', 'hotswap.wire', 'hotswap.errors', 'hotswap.sampling_params'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_buckets_are_bounded_and_flatten_matches_the_receiver():
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7, dtype=torch.float64)), ("c", torch.randn(5).to(torch.bfloat16)),
             ("d", torch.randn(2, 2)), ("e", torch.randn(1000))]
    buckets = list(iter_buckets(named, 100))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c", "d"], ["e"]]  # the 4000-byte tensor travels alone
    assert all(BucketMetadata.of(b).nbytes <= 100 for b in buckets[:-1])
    for cast in (None, torch.bfloat16):
        bucket = named[:4]
        meta = BucketMetadata.of(bucket, cast)
        flat = flatten_bucket(bucket, dtype=cast, device=torch.device("cpu"))
        metas = [BucketMeta(n, getattr(torch, d), tuple(s)) for n, d, s in zip(meta.names, meta.dtypes, meta.shapes)]
        offsets, total = bucket_layout(metas)
        assert total == flat.numel() == meta.nbytes
        for (name, t), m, off in zip(bucket, metas, offsets):
            got = flat[off: off + m.nbytes].clone().view(m.dtype).view(m.shape)
            assert torch.equal(got, t.to(cast or t.dtype)), name
    with pytest.raises(TypeError, match="dtype torch.int64"):
        BucketMetadata.of([("i", torch.arange(3))])


def test_tied_aliases_are_sent_once_from_a_mapping():
    emb = torch.randn(8, 4)
    sd = {"lm_head.weight": emb, "model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(4),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    assert [n for n, _ in iter_named_tensors(sd)] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert [n for n, _ in iter_named_tensors(list(sd.items()))] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_weight_update_extra_is_explicit_fields_on_the_wire_shape_trainers_read():
    """WeightUpdateOutput.extra's four facts are fields; the reply's `extra` object still holds only those set, in
    the order set (an older trainer reads `extra.get("received")` / `extra["session"]`)."""
    out = WeightUpdateOutput(success=True)
    assert json.loads(json.dumps(out))["extra"] == {}
    out.extra.received = False
    out.extra.validate_s = 0.5
    wire = json.dumps(out.to_dict())
    assert '"extra": {"received": false, "validate_s": 0.5}' in wire and out.extra.buckets is None
    assert EngineResult.of(json.loads(wire)).received is False and EngineResult.of(out).received is False


def test_engine_result_keeps_what_the_caller_saw_apart_from_the_reply():
    """A call that raised or got no reply in time is told by EngineResult's own fields; `data` holds only reply fields."""
    exc = EngineConnectionError("gone", outcome_unknown=True)

    def unreachable():
        raise exc

    r = call_result(unreachable)
    assert not r and r.exception is exc and r.outcome_unknown and not r.timed_out and r.data == {}
    late = wait_result(Future(), 0, "begin_weight_update")
    assert not late and late.timed_out and late.outcome_unknown and late.exception is None and late.data == {}


def test_engine_result_normalises_every_reply_shape():
    assert EngineResult.of(ControlOutput(success=True, message="ok")) == EngineResult(True, "ok", {})
    r = EngineResult.of(WeightUpdateOutput(success=False, message="no", extra=WeightUpdateExtra(received=False)))
    assert not r and r.message == "no" and r.received is False and r.get("weight_version") == ""
    assert EngineResult.of({"success": True, "message": "m", "x": 1}).get("x") == 1
    assert EngineResult.of((False, "tuple")) == EngineResult(False, "tuple")
    assert not EngineResult.of(None)


def test_disk_pusher_writes_a_sharded_checkpoint(engine, tiny_qwen3, tiny_qwen3_v2, tmp_path):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    pusher = DiskWeightPusher(engine, template_dir=tiny_qwen3, root_dir=tmp_path, max_shard_bytes=200_000, keep=True)
    res = pusher.push(v2, weight_version="step/7")
    assert res.success if hasattr(res, "success") else True
    assert res.weight_version == "step/7" and res.num_buckets == 3 and res.num_tensors == len(v2)
    folder = pusher.last_path
    assert folder.parent == tmp_path and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(v2) and len(set(index["weight_map"].values())) == 3
    assert state_dict_manifest(checkpoint_tensors(folder)) == state_dict_manifest(v2)
    assert verify_engine_weights(engine, v2).success
    # without keep, the folder goes away; a checkpoint missing tensors is refused and rolled back
    temp = DiskWeightPusher(engine, template_dir=tiny_qwen3)
    before = engine.check_weights("checksum").digest
    with pytest.raises(WeightPushError, match="checkpoint lacks parameter") as info:
        temp.push(dict(list(checkpoint_tensors(tiny_qwen3).items())[:3]), weight_version="partial")
    assert info.value.rolled_back and not temp.last_path.exists()
    assert engine.check_weights("checksum").digest == before and engine.weight_version == "step/7"
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(v2, folder)


def test_trainer_side_failure_aborts_the_session(engine, tiny_qwen3_v2):
    """A failure on the trainer between buckets (here: an unsendable tensor) must not commit the buckets
    already sent: the pusher ends the session with abort=True."""
    before = engine.check_weights("checksum").digest
    v2 = list(checkpoint_tensors(tiny_qwen3_v2).items())
    weights = v2[:10] + [("model.layers.0.mlp.up_proj.weight", torch.zeros(3, dtype=torch.int64))] + v2[10:]
    with pytest.raises(WeightPushError, match="int64") as info:
        IPCWeightPusher(engine, bucket_bytes=50_000).push(weights, weight_version="broken")
    assert info.value.rolled_back
    assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"
    assert not engine.get_load().paused


def test_distributed_pusher_needs_another_process_for_the_engine(engine):
    """Two ranks of one group cannot live in one interpreter (torch keys the group's store by its name):
    refused at once, with a message, and the engine keeps working."""
    pusher = DistributedWeightPusher(engine, group_name="same-process", timeout_s=3)
    with pytest.raises(WeightPushError, match="cannot share a weights update group inside one interpreter"):
        pusher.connect()
    with pytest.raises(WeightPushError, match="connect"):
        pusher.push({"model.norm.weight": torch.ones(64)})
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_engine_result_keeps_every_field_of_sglang_reply_shapes(engine, tiny_qwen3, tiny_qwen3_v2, tmp_path):
    """The disk update's 3-tuple, SGLang's output dataclasses and HTTP dicts all keep their fields, and a
    pusher driving handles that answer in tuples still pushes and reads the version."""
    from dataclasses import dataclass

    from hotswap.protocol import DiskUpdateOutput

    @dataclass
    class UpdateWeightFromDiskReqOutput:  # SGLang's io_struct shape: no to_dict
        success: bool
        message: str
        num_paused_requests: int = 0

    out = DiskUpdateOutput(success=True, message="ok", num_paused_requests=2, weight_version="v")
    for reply in (out, out.astuple(), UpdateWeightFromDiskReqOutput(True, "ok", 2), {"success": True, "message": "ok", "num_paused_requests": 2}):
        r = EngineResult.of(reply)
        assert r.success and r.message == "ok" and r.get("num_paused_requests") == 2, reply
    assert not EngineResult.of((False, "refused", 0)) and EngineResult.of((False, "refused", 0)).message == "refused"

    class TupleEngine:  # answers as SGLang's Engine does: tuples (disk: the 3-tuple)
        def __getattr__(self, name):
            method = getattr(engine, name)
            return lambda *a, **kw: tuple(method(*a, **kw))

    v2 = checkpoint_tensors(tiny_qwen3_v2)
    assert len(TupleEngine().update_weights_from_disk(str(tiny_qwen3))) == 3
    for sessions, version in ((False, "t2"), (True, "t3")):
        res = DiskWeightPusher(TupleEngine(), template_dir=tiny_qwen3, root_dir=tmp_path, use_sessions=sessions).push(v2, weight_version=version)
        assert res.weight_version == version and engine.weight_version == version and verify_engine_weights(engine, v2).success


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_shared_memory_buckets_for_many_engines_hold_one_bucket_per_call_in_flight(in_flight):
    """Three engines with their own IPC tokens and a cast to bf16: the trainer's extra memory while an
    engine loads a bucket (shared-memory blocks plus tensors it made) stays within one bucket per call in flight."""
    import gc
    import os
    import secrets
    import threading
    from multiprocessing import shared_memory

    weights = {f"model.layers.{i}.w": torch.randn(64, 64) for i in range(12)}  # 16 KiB each in fp32, 8 KiB in bf16
    bucket_bytes = 4 * 64 * 64 * 2
    originals = {t.untyped_storage().data_ptr() for t in weights.values()}

    def extra_tensor_bytes() -> int:
        return live_tensor_bytes(originals)

    def shm_bytes() -> int:
        """The engines' blocks now; one listed may be unlinked before it is measured (a call in flight answered)."""
        total = 0
        for f in os.listdir("/dev/shm"):
            if f.startswith("hotswap_") and any(e.token in f for e in engines):
                try:
                    total += os.path.getsize(f"/dev/shm/{f}")
                except FileNotFoundError:
                    pass
        return total

    peaks = []
    measuring = threading.Lock()

    class ShmEngine:
        """Reads what it is given (and checks it) while measuring what the trainer holds meanwhile."""

        def __init__(self):
            self.token = secrets.token_hex(8)

        def get_ipc_token(self):
            return self.token

        def begin_weight_update(self):
            return {"success": True}

        def end_weight_update(self, weight_version=None, abort=False):
            return {"success": True, "weight_version": weight_version}

        def update_weights_from_tensor(self, named_tensors, **kw):
            # one engine at a time measures and checks: the tensors another engine's check makes are not the trainer's
            with measuring:
                peaks.append(shm_bytes() + extra_tensor_bytes() - baseline)
                d = named_tensors[0]
                block = shared_memory.SharedMemory(name=d["shm_name"])
                try:
                    got = torch.frombuffer(block.buf, dtype=torch.bfloat16, count=64 * 64, offset=d["offset"]).clone().view(64, 64)
                finally:
                    block.close()
                same = d["dtype"] == "bfloat16" and torch.equal(got, weights[d["name"]].to(torch.bfloat16))
                del got
            assert same
            return {"success": True}

    engines = [ShmEngine() for _ in range(3)]
    gc.collect()
    baseline = extra_tensor_bytes()
    res = IPCWeightPusher(engines, bucket_bytes=bucket_bytes, dtype=torch.bfloat16, calls_in_flight=in_flight).push(weights, weight_version="m")
    assert res.num_buckets == 3 and len(peaks) == 9
    # a block per call in flight (and, for each, at most one tensor being cast and the view it is copied into)
    assert max(peaks) <= in_flight * (bucket_bytes + 64 * 64 * 2), peaks


def live_tensor_bytes(skip: set[int]) -> int:
    """Bytes of the CPU tensor storages alive in this process, but those at `skip` (data pointers)."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            if st.data_ptr() not in skip:
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def test_distributed_buckets_hold_one_bucket_on_the_trainer(monkeypatch):
    """Broadcasting flattened buckets cast to bf16: what the trainer holds beyond its weights while a bucket
    is on the wire is that bucket (and at most one tensor being cast)."""
    import gc
    from datetime import timedelta

    import torch.distributed as dist

    from hotswap.trainer import free_port
    from hotswap.wire.process_group import init_custom_process_group

    weights = {f"model.layers.{i}.w": torch.randn(64, 64) for i in range(12)}
    bucket_bytes = 4 * 64 * 64 * 2
    originals = {t.untyped_storage().data_ptr() for t in weights.values()}

    class Receiver:  # the engine side's replies; the bytes go through a real one-rank gloo group
        def begin_weight_update(self):
            return {"success": True}

        def end_weight_update(self, weight_version=None, abort=False):
            return {"success": True, "weight_version": weight_version}

        def update_weights_from_distributed(self, names, dtypes, shapes, **kw):
            return {"success": True, "extra": {"received": True}}

    peaks, real_broadcast = [], dist.broadcast

    def measured_broadcast(tensor, *args, **kwargs):
        peaks.append(live_tensor_bytes(originals) - baseline)
        return real_broadcast(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "broadcast", measured_broadcast)
    pusher = DistributedWeightPusher(Receiver(), backend="gloo", bucket_bytes=bucket_bytes, dtype=torch.bfloat16, timeout_s=10,
                                     group_name="memory-bound")
    pusher.pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0,
                                          group_name="memory-bound", timeout=timedelta(seconds=10))
    try:
        gc.collect()
        baseline = live_tensor_bytes(originals)
        res = pusher.push(weights, weight_version="d")
    finally:
        pusher._drop_group()
    assert res.num_buckets == 3 and len(peaks) == 3
    assert max(peaks) <= bucket_bytes + 64 * 64 * 2, peaks


class SessionRecorder:
    """A fake engine that records the session each call names ("-" when the call gave no session_id at all).
    With `ids` its begin answers a fresh session id, as hotswap does; without, none, as SGLang does.
    `refuse_bucket` refuses that bucket (0-based), so the pusher aborts."""

    def __init__(self, ids: bool, refuse_bucket: int | None = None):
        self.ids, self.refuse_bucket = ids, refuse_bucket
        self.calls: list[tuple[str, str]] = []
        self.begun = self.buckets = 0

    def _bucket(self, kw: dict) -> dict:
        self.calls.append(("bucket", kw.get("session_id", "-")))
        self.buckets += 1
        ok = self.buckets - 1 != self.refuse_bucket
        return {"success": ok, "message": "" if ok else "refused", "extra": {"received": True}}

    def begin_weight_update(self):
        self.begun += 1
        self.calls.append(("begin", "-"))
        return {"success": True, **({"session_id": f"s{self.begun}"} if self.ids else {})}

    def end_weight_update(self, weight_version=None, abort=False, **kw):
        self.calls.append(("abort" if abort else "end", kw.get("session_id", "-")))
        return {"success": True, "weight_version": weight_version}

    def update_weights_from_tensor(self, named_tensors, **kw):
        return self._bucket(kw)

    def update_weights_from_disk(self, model_path, **kw):
        return self._bucket(kw)

    def update_weights_from_distributed(self, names, dtypes, shapes, **kw):
        return self._bucket(kw)

    def get_ipc_token(self):
        return "recorder"


@pytest.mark.parametrize("transport", ["ipc", "disk", "distributed"])
def test_pushers_name_each_engines_session_on_every_call(transport, tiny_qwen3, tmp_path):
    """Every bucket call and the commit or abort of a push name the session the engine's begin answered (each
    engine its own); an engine that answered none (SGLang) gets no session_id at all."""
    from datetime import timedelta

    from hotswap.trainer import free_port
    from hotswap.wire.process_group import destroy_custom_process_group, init_custom_process_group

    weights = {f"model.layers.{i}.w": torch.randn(32, 32) for i in range(4)}
    buckets = 1 if transport == "disk" else 2  # per push; the disk pusher loads the whole checkpoint in one call
    engines = [SessionRecorder(ids=True), SessionRecorder(ids=False), SessionRecorder(ids=True, refuse_bucket=2 * buckets - 1)]
    kw = {"bucket_bytes": 2 * 32 * 32 * 4}
    if transport == "ipc":
        pusher = IPCWeightPusher(engines, **kw)
    elif transport == "disk":
        pusher = DiskWeightPusher(engines, template_dir=tiny_qwen3, root_dir=tmp_path, max_shard_bytes=kw["bucket_bytes"])
    else:
        pusher = DistributedWeightPusher(engines, backend="gloo", timeout_s=10, group_name="sid", **kw)
        pusher.pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0,
                                              group_name="sid", timeout=timedelta(seconds=10))
    try:
        pusher.push(weights, weight_version="v1")
        with pytest.raises(WeightPushError):  # the third engine refuses the last bucket of this push
            pusher.push(weights, weight_version="v2")
    finally:
        if transport == "distributed":
            destroy_custom_process_group(pusher.pg)
    first = [("begin", "-")] + [("bucket", "s1")] * buckets + [("end", "s1")]
    second = [("begin", "-"), ("bucket", "s2")] + ([] if transport == "disk" else [("bucket", "s2")]) + [("abort", "s2")]
    assert engines[0].calls == first + second
    assert all(sid == "-" for _, sid in engines[1].calls)  # no session id was ever sent to it
    assert engines[2].calls[:len(first)] == first and ("abort", "s2") in engines[2].calls
    assert pusher.session_ids == [None, None, None]  # a later call never names an ended push's session
