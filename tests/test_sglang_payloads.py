"""SGLang's `serialized_named_tensors` as colocated frameworks send them, decoded without running the wire.

Payloads are made the way the senders make them: `MultiprocessingSerializer.serialize` is a
`ForkingPickler` dump (base64 text when `output_str=True`, as slime sends over HTTP); slime's and miles'
`flattened_bucket` comes from `FlattenedTensorBucket` (sglang/srt/weight_sync/tensor_bucket.py), verl's
`LocalSerializedTensor` list from `sglang.srt.weight_sync.utils.update_weights`. SGLang's classes are
stood in for by test classes registered under SGLang's module names, so the pickle stream names the
same globals.
"""

from __future__ import annotations

import base64
import io
import math
import multiprocessing
import os
import pickle
import sys
import time
import types
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing import reductions

from hotswap.weights.sglang_payloads import PayloadError, decode_serialized_named_tensors
from hotswap.weights.torch_handles import TensorHandleError


def serialize(obj: object, output_str: bool = False) -> bytes | str:
    """What SGLang's MultiprocessingSerializer.serialize does."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    data = buf.getvalue()
    return base64.b64encode(data).decode() if output_str else data


@pytest.fixture(autouse=True)
def file_system_sharing():
    """CPU tensors shared the way a colocated CPU trainer must share them (named /dev/shm objects)."""
    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    yield
    mp.set_sharing_strategy(before)


@dataclass
class FlattenedTensorMetadata:
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@dataclass
class LocalSerializedTensor:
    values: list[bytes]


@pytest.fixture
def sglang_names(monkeypatch):
    """Register the stand-ins under SGLang's module paths, so pickle writes SGLang's global names."""
    modules = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket",
        "sglang.srt.model_executor", "sglang.srt.model_executor.model_runner")}
    for cls, module in ((FlattenedTensorMetadata, "sglang.srt.weight_sync.tensor_bucket"),
                        (LocalSerializedTensor, "sglang.srt.model_executor.model_runner")):
        monkeypatch.setattr(cls, "__module__", module)
        setattr(modules[module], cls.__name__, cls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def flattened_bucket(named: list[tuple[str, torch.Tensor]], by_bytes: bool = True) -> dict:
    """The trainer side of a flattened bucket, from SGLang's facts: each tensor flattened (as uint8 bytes
    in the multi-dtype bucket, else in its own dtype) and concatenated; metadata holds name, shape,
    dtype, start and end index into the flat tensor and the count between them."""
    pieces, metadata, at = [], [], 0
    for name, t in named:
        flat = t.contiguous().reshape(-1)
        flat = flat.view(torch.uint8) if by_bytes else flat
        metadata.append(FlattenedTensorMetadata(name=name, shape=t.shape, dtype=t.dtype, start_idx=at, end_idx=at + flat.numel(),
                                                numel=flat.numel()))
        pieces.append(flat)
        at += flat.numel()
    return {"flattened_tensor": torch.cat(pieces), "metadata": metadata}


def assert_same(decoded: list[tuple[str, torch.Tensor]], expected: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in decoded] == [n for n, _ in expected]
    for (name, got), (_, want) in zip(decoded, expected):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    return [("model.layers.0.self_attn.q_proj.weight", w), ("model.norm.weight", torch.randn(6, generator=g)),
            ("lm_head.weight", w.t()), ("model.layers.0.mlp.down_proj.weight", torch.randn(10, generator=g)[3:9].reshape(2, 3)),
            ("a.int8", torch.arange(-3, 4, dtype=torch.int8)), ("a.param", torch.nn.Parameter(torch.ones(3, dtype=torch.float16)))]


@pytest.mark.parametrize("output_str", [False, True])
@pytest.mark.parametrize("load_format", [None, "direct"])
def test_named_tensor_list_decodes_to_equal_tensors(output_str, load_format):
    named = sample_tensors()
    payload = serialize(named, output_str=output_str)
    decoded = decode_serialized_named_tensors([payload], tp_rank=0, load_format=load_format)
    assert decoded.load_format == load_format
    assert_same(decoded.named_tensors, named)


def test_each_tp_rank_reads_its_own_payload():
    per_rank = [[("w", torch.full((2, 2), float(r)))] for r in range(3)]
    payloads = [serialize(named, output_str=True) for named in per_rank]
    for r in range(3):
        assert_same(decode_serialized_named_tensors(payloads, tp_rank=r, load_format=None).named_tensors, per_rank[r])
    with pytest.raises(PayloadError, match="none for TP rank 3"):
        decode_serialized_named_tensors(payloads, tp_rank=3, load_format=None)


def test_local_serialized_tensors_give_each_rank_its_value(sglang_names):
    """verl: sglang.srt.weight_sync.utils.update_weights sends (name, LocalSerializedTensor(values per rank))."""
    ranks = [[("w", torch.randn(3, 2)), ("b", torch.randn(2))] for _ in range(2)]
    named = [(name, LocalSerializedTensor(values=[serialize(ranks[r][i][1]) for r in range(2)]))
             for i, (name, _) in enumerate(ranks[0])]
    payloads = [serialize(named) for _ in range(2)]
    for r in range(2):
        assert_same(decode_serialized_named_tensors(payloads, tp_rank=r, load_format=None).named_tensors, ranks[r])


@pytest.mark.parametrize("by_bytes", [True, False], ids=["multi_dtype", "one_dtype"])
def test_flattened_bucket_round_trip(sglang_names, by_bytes):
    named = sample_tensors() if by_bytes else [(n, t) for n, t in sample_tensors() if t.dtype == torch.bfloat16]
    named = [(n, t.detach()) for n, t in named]
    payload = serialize(flattened_bucket(named, by_bytes=by_bytes), output_str=True)
    decoded = decode_serialized_named_tensors([payload], tp_rank=0, load_format="flattened_bucket")
    assert decoded.load_format == "flattened_bucket"
    assert_same(decoded.named_tensors, named)


def test_flattened_bucket_with_a_misaligned_tensor(sglang_names):
    named = [("odd", torch.arange(3, dtype=torch.uint8)), ("f", torch.randn(5)), ("h", torch.randn(2, 2).half())]
    payload = serialize(flattened_bucket(named))
    assert_same(decode_serialized_named_tensors([payload], 0, "flattened_bucket").named_tensors, named)


def test_empty_flattened_bucket_loads_nothing(sglang_names):
    """slime pads ranks that have fewer buckets with an empty one."""
    payload = serialize({"flattened_tensor": torch.empty(0, dtype=torch.uint8), "metadata": []}, output_str=True)
    assert decode_serialized_named_tensors([payload], 0, "flattened_bucket").named_tensors == []


def test_bucket_metadata_must_fit_the_flat_tensor(sglang_names):
    bucket = flattened_bucket([("w", torch.randn(4))])
    bucket["metadata"][0].end_idx = 32
    bucket["metadata"][0].numel = 32
    with pytest.raises(PayloadError, match="do not hold shape"):
        decode_serialized_named_tensors([serialize(bucket)], 0, "flattened_bucket")
    bucket = flattened_bucket([("w", torch.randn(4))])
    bucket["metadata"][0].shape = torch.Size([8])
    bucket["metadata"][0].end_idx = bucket["metadata"][0].numel = 32
    with pytest.raises(PayloadError, match="runs past the flat tensor"):
        decode_serialized_named_tensors([serialize(bucket)], 0, "flattened_bucket")


def test_unknown_load_format_and_bad_envelopes_are_refused():
    payload = serialize([("w", torch.ones(2))])
    with pytest.raises(PayloadError, match="unsupported load_format 'safetensors'"):
        decode_serialized_named_tensors([payload], 0, "safetensors")
    with pytest.raises(PayloadError, match="not valid base64"):
        decode_serialized_named_tensors(["%%%"], 0, None)
    with pytest.raises(PayloadError, match="must be bytes or base64 text"):
        decode_serialized_named_tensors([None], 0, None)
    with pytest.raises(PayloadError, match="a dict of flattened_tensor and metadata"):
        decode_serialized_named_tensors([payload], 0, "flattened_bucket")
    with pytest.raises(PayloadError, match="expected a list of"):
        decode_serialized_named_tensors([serialize({"w": torch.ones(2)})], 0, None)


def _shared_nest(depth: int, pair) -> object:
    """An object of `depth` levels, each holding the level below twice: a ~100-byte pickle (the memo shares each
    level) that stands for 2**depth leaves when hashed or printed in full."""
    obj: object = (0,)
    for _ in range(depth):
        obj = pair(obj)
    return obj


def _pickle_body(obj: object) -> bytes:
    """`obj`'s protocol-4 opcodes without the header, frame and STOP (its memo indices start at 0)."""
    data = pickle.dumps(obj, protocol=4)
    start = 2 + (9 if data[2:3] == pickle.FRAME else 0)
    return data[start:-1]


def _hashing(opcodes: bytes) -> bytes:
    """A pickle that hashes a 40-deep shared tuple while it loads: built by hand, since building it here would hash it
    (no memo index is taken before the tuple's own, so its gets stay right)."""
    return pickle.PROTO + b"\x04" + opcodes + pickle.STOP


_NEST = _pickle_body(_shared_nest(40, lambda o: (o, o)))


@pytest.mark.parametrize("data", [
    pytest.param(pickle.dumps([(_shared_nest(40, lambda o: [o, o]), None)], protocol=4), id="a list where a name goes, quoted in the error"),
    pytest.param(_hashing(pickle.EMPTY_DICT + _NEST + pickle.BININT1 + b"\x01" + pickle.SETITEM), id="a dict key"),
    pytest.param(_hashing(pickle.EMPTY_DICT + pickle.MARK + _NEST + pickle.BININT1 + b"\x01" + pickle.SETITEMS), id="dict keys"),
    pytest.param(_hashing(pickle.MARK + _NEST + pickle.BININT1 + b"\x01" + pickle.DICT), id="a dict built whole"),
    pytest.param(_hashing(pickle.MARK + _NEST + pickle.FROZENSET), id="a frozenset"),
    pytest.param(_hashing(pickle.EMPTY_SET + pickle.MARK + _NEST + pickle.ADDITEMS), id="a set"),
])
def test_a_shared_structure_costs_nothing_to_refuse(data):
    """A security review's finding: a pickle of a few hundred bytes whose memo shares each level of a nest 40 deep made
    the error message (a repr cut only after it was built) or the unpickler (hashing a tuple key) take hours and
    gigabytes on the scheduler thread. Keys must be flat, and refusals quote values through `shown`."""
    assert len(data) < 1000
    payload = base64.b64encode(data).decode()
    for load_format in (None, "flattened_bucket"):
        start = time.perf_counter()
        with pytest.raises(PayloadError):
            decode_serialized_named_tensors([payload], 0, load_format)
        assert time.perf_counter() - start < 5.0  # hours before the fix (2**40 leaves); microseconds now


def test_file_descriptor_sharing_is_refused_with_the_fix():
    mp.set_sharing_strategy("file_descriptor")
    payload = serialize([("w", torch.ones(2))])
    with pytest.raises(PayloadError, match="file_descriptor strategy.*set_sharing_strategy\\('file_system'\\)"):
        decode_serialized_named_tensors([payload], 0, None)


# ---- malicious payloads -----------------------------------------------------------------------------


class Reduce:
    """Pickles as `func(*args)`: the way an attacker (or torch) writes a call into a pickle."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle only writes callables as a REDUCE's function
        raise AssertionError("never called")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "executed"
    yield path
    assert not path.exists(), "a payload ran code"


def _attacks(marker) -> dict[str, tuple[object, str]]:
    import subprocess

    cmd = f"touch {marker}"
    return {
        "os.system": (Reduce(os.system, (cmd,)), r"refused to unpickle global (os|posix)\.system"),
        "eval": (Reduce(eval, (f"open({str(marker)!r}, 'w')",)), "refused to unpickle global builtins.eval"),
        "getattr": (Reduce(Reduce(getattr, (Reduce(__import__, ("os",)), "system")), (cmd,)),
                    "refused to unpickle global builtins.getattr"),
        "Popen": (Reduce(subprocess.Popen, (["touch", str(marker)],)), "refused to unpickle global subprocess.Popen"),
        # a REDUCE whose callable is itself the result of a REDUCE (of a whitelisted rebuild function)
        "nested": (Reduce(Reduce(reductions.rebuild_storage_empty, (torch.UntypedStorage,)), (cmd,)), "nested reducer"),
        # a whitelisted class called instead of named
        "class call": (Reduce(torch.Tensor, ([1.0],)), "refused to call torch.Tensor"),
    }


@pytest.mark.parametrize("attack", ["os.system", "eval", "getattr", "Popen", "nested", "class call"])
@pytest.mark.parametrize("where", ["top", "tensor", "bucket"])
def test_malicious_payloads_are_refused_and_nothing_runs(attack, where, marker, sglang_names):
    evil, message = _attacks(marker)[attack]
    obj = {"top": evil, "tensor": [("w", evil)],
           "bucket": {"flattened_tensor": torch.empty(0, dtype=torch.uint8), "metadata": [evil]}}[where]
    for output_str in (False, True):
        with pytest.raises(PayloadError, match=message):
            decode_serialized_named_tensors([serialize(obj, output_str)], 0, "flattened_bucket" if where == "bucket" else None)


class ReduceWithState(Reduce):
    """Pickles as `func(*args)` followed by BUILD with `state`."""

    def __init__(self, func, args, state):
        super().__init__(func, args)
        self.state = state

    def __reduce__(self):
        return self.func, self.args, self.state


@pytest.mark.parametrize("state", [(None, {"func": {}}), (None, {"args": ()}), {"func": "x"}])
def test_a_pickled_state_cannot_rewrite_a_rebuild_record(state):
    """BUILD on a recorded call (a frozen slots dataclass) would otherwise set its fields from the stream."""
    evil = ReduceWithState(reductions.rebuild_storage_empty, (torch.UntypedStorage,), state)
    with pytest.raises(PayloadError, match="refused to set the state of RebuildCall"):
        decode_serialized_named_tensors([serialize([("w", evil)])], 0, None)


def test_malicious_value_inside_a_local_serialized_tensor(marker, sglang_names):
    inner = pickle.dumps(Reduce(os.system, (f"touch {marker}",)))
    payload = serialize([("w", LocalSerializedTensor(values=[inner]))])
    with pytest.raises(PayloadError, match=r"'w' \(TP rank 0\): refused to unpickle global (os|posix)\.system"):
        decode_serialized_named_tensors([payload], 0, None)


def _shared_file_tensor(manager: bytes, name: bytes, nbytes: int, shape=(4,), dtype=torch.float32) -> Reduce:
    """A CPU tensor record as reduce_tensor writes it, with chosen storage arguments."""
    storage = Reduce(reductions.rebuild_typed_storage,
                     (Reduce(reductions.rebuild_storage_filename, (torch.UntypedStorage, manager, name, nbytes)), dtype))
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return Reduce(reductions.rebuild_tensor, (torch.Tensor, storage, (0, torch.Size(shape), stride, False)))


def _real_handle(t: torch.Tensor) -> tuple[bytes, bytes]:
    """The (manager socket, shm name) torch gives a tensor it shares with file_system, with the reference
    a sender adds for each payload (reduce_storage's incref), which the receiver's open gives back."""
    manager, name, _ = t.untyped_storage()._share_filename_cpu_()
    t.untyped_storage()._shared_incref()
    return manager, name


@pytest.mark.parametrize("name", [b"/etc/passwd", b"/../../etc/passwd", b"/torch_1_2_3/../../etc/passwd", b"torch_1_2_3",
                                  b"/torch_1_2_3\x00", b"/dev/shm/torch_1_2_3"])
def test_a_rebuild_record_naming_an_arbitrary_path_is_refused(name):
    manager, _ = _real_handle(torch.ones(4).share_memory_())
    with pytest.raises(PayloadError, match="not a torch shared-memory object name|has control characters"):
        decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, name, 16))])], 0, None)


def test_a_shared_object_is_checked_against_the_declared_size():
    t = torch.arange(4.0).share_memory_()
    manager, name = _real_handle(t)
    assert_same(decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, name, 16))])], 0, None).named_tensors,
                [("w", t)])
    manager, name = _real_handle(t)  # the next payload's reference
    with pytest.raises(TensorHandleError, match="holds 80 bytes, not the 64-byte header \\+ 4096 bytes"):
        decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, name, 4096, shape=(1024,)))])], 0, None)
    with pytest.raises(PayloadError, match="reach past the shared storage \\(16 bytes\\)"):
        decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, name, 16, shape=(8,)))])], 0, None)
    with pytest.raises(TensorHandleError, match="does not exist"):
        decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, b"/torch_1_2_999999", 16))])], 0, None)


@pytest.mark.parametrize("manager", [b"/etc/passwd", b"/tmp/torch-shm-dir-x/../../etc/manager.sock", b"relative/manager.sock"])
def test_the_manager_socket_must_be_torchs(manager, tmp_path):
    t = torch.arange(4.0).share_memory_()
    _, name = _real_handle(t)
    with pytest.raises(TensorHandleError, match="not a torch shared-memory manager socket"):
        decode_serialized_named_tensors([serialize([("w", _shared_file_tensor(manager, name, 16))])], 0, None)


# ---- CUDA IPC ------------------------------------------------------------------------------------------


def _cuda_tensor(rebuild, device) -> Reduce:
    """rebuild_cuda_tensor's 15 arguments for a (3, 4) bfloat16 tensor, with made-up handles."""
    return Reduce(rebuild, (torch.Tensor, torch.Size([3, 4]), (4, 1), 0, torch.storage.TypedStorage, torch.bfloat16, device,
                            b"h" * 64, 24, 0, False, b"/torch_ref_counter", 0, b"e" * 64, True))


def _sglang_patch_torch() -> tuple[dict[str, types.ModuleType], object]:
    """SGLang's patched rebuild function and the modules (to put in sys.modules) that name it by its path."""
    module = types.ModuleType("sglang.srt.utils.patch_torch")

    def _rebuild_cuda_tensor_modified(*args):
        raise AssertionError("never called")

    _rebuild_cuda_tensor_modified.__module__ = module.__name__
    _rebuild_cuda_tensor_modified.__qualname__ = "_rebuild_cuda_tensor_modified"
    module._rebuild_cuda_tensor_modified = _rebuild_cuda_tensor_modified
    modules = {name: types.ModuleType(name) for name in ("sglang", "sglang.srt", "sglang.srt.utils")}
    modules[module.__name__] = module
    return modules, _rebuild_cuda_tensor_modified


def _patched_rebuild(monkeypatch):
    """SGLang's patched rebuild function, registered under its module path for this test."""
    modules, rebuild = _sglang_patch_torch()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return rebuild


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU engine's refusal")
@pytest.mark.parametrize("patched", [False, True], ids=["torch", "sglang_uuid"])
def test_cuda_handles_are_checked_then_refused_on_a_cpu_engine(patched, monkeypatch):
    rebuild = _patched_rebuild(monkeypatch) if patched else reductions.rebuild_cuda_tensor
    device = "GPU-8e2a0c1d-0000-0000-0000-000000000000" if patched else 0
    with pytest.raises(TensorHandleError, match="'w': a CUDA IPC handle needs a CUDA engine"):
        decode_serialized_named_tensors([serialize([("w", _cuda_tensor(rebuild, device))])], 0, None)
    with pytest.raises(PayloadError, match="reach past the shared storage \\(16 bytes\\)"):
        bad = _cuda_tensor(rebuild, device)
        bad.args = (*bad.args[:8], 16, *bad.args[9:])
        decode_serialized_named_tensors([serialize([("w", bad)])], 0, None)
    with pytest.raises(PayloadError, match="device must be a CUDA ordinal or a GPU UUID"):
        bad = _cuda_tensor(rebuild, device)
        bad.args = (*bad.args[:6], [0], *bad.args[7:])
        decode_serialized_named_tensors([serialize([("w", bad)])], 0, None)
    with pytest.raises(PayloadError, match="must name torch's tensor and storage classes"):  # unhashable, not a ref
        bad = _cuda_tensor(rebuild, device)
        bad.args = ([torch.Tensor], *bad.args[1:])
        decode_serialized_named_tensors([serialize([("w", bad)])], 0, None)


# ---- CUDA IPC (GPU) -----------------------------------------------------------------------------------


def _cuda_producer(queue, done, uuid_device: bool) -> None:
    """A trainer process: serializes CUDA tensors (with SGLang's UUID device form when asked) and keeps
    them alive until the engine side is done."""
    from multiprocessing.reduction import ForkingPickler

    import torch
    from torch.multiprocessing import reductions

    named = [("w", torch.arange(12.0, device="cuda").reshape(3, 4).to(torch.bfloat16)), ("b", torch.arange(8.0, device="cuda")[2:6])]
    torch.cuda.synchronize()
    if uuid_device:  # what SGLang's monkey_patch_torch_reductions writes: its rebuild function, the GPU's UUID
        modules, rebuild = _sglang_patch_torch()
        sys.modules.update(modules)
        pairs = []
        for name, t in named:
            _, args = reductions.reduce_tensor(t)
            args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
            pairs.append((name, Reduce(rebuild, args)))
    else:
        pairs = named
    buf = io.BytesIO()
    ForkingPickler(buf).dump(pairs)
    queue.put((buf.getvalue(), pickle.dumps([t.cpu() for _, t in named])))  # plain pickle: the bytes inline
    done.wait(60)


@pytest.mark.gpu
@pytest.mark.parametrize("uuid_device", [False, True])
def test_cuda_ipc_payload_from_another_process(uuid_device):
    ctx = multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_cuda_producer, args=(queue, done, uuid_device))
    proc.start()
    try:
        payload, expected = queue.get(timeout=120)
        expected = pickle.loads(expected)
        decoded = decode_serialized_named_tensors([base64.b64encode(payload).decode()], 0, None)
        got = [(n, t.cpu()) for n, t in decoded.named_tensors]
        assert all(t.is_cuda for _, t in decoded.named_tensors)
        assert_same(got, list(zip(["w", "b"], expected)))
        del decoded
    finally:
        done.set()
        proc.join(60)
