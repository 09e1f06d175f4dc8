"""CUDA IPC descriptors sharing one producer storage are opened once (weights/ipc_grouped.py).
The opening itself is faked with CPU storages here; the real handles run in bench/weight_sync.py."""

from __future__ import annotations

import pytest
import torch

from hotswap.errors import HotswapError
from hotswap.weights import ipc_grouped
from hotswap.weights.ipc_grouped import resolve_grouped
from hotswap.wire.dtypes import dtype_from_name


def descriptor(name: str, t: torch.Tensor, handle: str) -> dict:
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
            "storage_offset": t.storage_offset(), "kind": "cuda_ipc", "device": 0, "handle": handle,
            "storage_size": t.untyped_storage().nbytes(), "storage_handle_offset": 0}


@pytest.fixture
def fake_open(monkeypatch):
    storages: dict[str, torch.Tensor] = {}
    opened: list[str] = []

    def resolve(items, mappings=None, *, shm_prefix=None):
        out = []
        for d in items:
            if isinstance(d, dict):
                opened.append(d["name"])
                base = storages[d["handle"]]
                assert d["storage_size"] == base.untyped_storage().nbytes()
                t = torch.empty(0, dtype=dtype_from_name(d["dtype"])).set_(base.untyped_storage(), d["storage_offset"], d["shape"], d["stride"])
                out.append((d["name"], t))
            else:
                out.append((str(d[0]), d[1]))
        return out

    monkeypatch.setattr(ipc_grouped, "resolve_named_tensors", resolve)
    return storages, opened


def test_shared_storage_opened_once(fake_open):
    storages, opened = fake_open
    flat = torch.randn(4096, dtype=torch.float32)
    views = {"a": flat[:600].view(20, 30), "b": flat[600:1000], "c": flat[1000:1600].view(30, 20).t(), "d": flat[4000:]}
    other = torch.randn(7, 3, dtype=torch.bfloat16)
    storages["H1"], storages["H2"] = flat, other
    items = [descriptor(n, t, "H1") for n, t in views.items()] + [descriptor("e", other, "H2"), ("f", torch.ones(2))]
    got = resolve_grouped(items)
    assert [n for n, _ in got] == ["a", "b", "c", "d", "e", "f"]
    for (name, t), want in zip(got, [*views.values(), other, torch.ones(2)]):
        assert t.shape == want.shape and t.stride() == want.stride() and torch.equal(t, want), name
    assert opened == ["e", "d (storage)"]  # the lone one as is; the shared storage once, through its last descriptor


def test_shared_storage_checks_each_view(fake_open):
    storages, _ = fake_open
    flat = torch.randn(100)
    storages["H"] = flat
    good = descriptor("a", flat[:50], "H")
    bad = dict(descriptor("b", flat[50:], "H"), storage_offset=90)
    with pytest.raises(HotswapError, match="reach past"):
        resolve_grouped([good, bad])
    with pytest.raises(HotswapError, match="stride"):
        resolve_grouped([good, dict(descriptor("b", flat[50:], "H"), stride=[1, 1])])
    with pytest.raises(HotswapError, match="dtype"):
        resolve_grouped([dict(good, dtype="int7"), descriptor("b", flat[50:], "H")])


def test_ipc_mappings_keep_recent_storages_within_their_bound():
    """Kept mappings: a repeated handle is opened once; least recently used ones go first past the bound,
    and a storage larger than the bound is opened but never kept."""
    from hotswap.weights.ipc import CudaIpcMappings

    opened: list[str] = []

    def opener(key: str, nbytes: int):
        return lambda: opened.append(key) or torch.UntypedStorage(nbytes)

    m = CudaIpcMappings(max_bytes=100)
    a = m.get("a", opener("a", 40), 40)
    assert m.get("a", opener("a", 40), 40) is a and opened == ["a"]
    m.get("b", opener("b", 40), 40)
    m.get("a", opener("a", 40), 40)  # a is now the most recent
    m.get("c", opener("c", 40), 40)  # 120 > 100: b goes
    assert list(m.storages) == ["a", "c"] and m.mapped_bytes == 80
    m.get("big", opener("big", 500), 500)
    assert "big" not in m.storages and m.mapped_bytes == 80
    assert (m.hits, m.misses) == (2, 4) and opened == ["a", "b", "c", "big"]
    assert m.get("b", opener("b", 40), 40) is not None and opened[-1] == "b"  # evicted: opened again

    # views over a kept storage are checked and built once per geometry; eviction drops them with it
    made: list[tuple] = []

    def make(g):
        return lambda: made.append(g) or torch.empty(3)

    assert list(m.storages) == ["c", "b"]
    vc = m.view("c", ("bf16", (3,)), make(("c", 1)))
    assert m.view("c", ("bf16", (3,)), make(("c", 2))) is vc and made == [("c", 1)]
    m.view("c", ("bf16", (1, 3)), make(("c", 3)))
    m.view("big", ("bf16", (3,)), make(("big", 1)))
    m.view("big", ("bf16", (3,)), make(("big", 2)))  # not kept: built every time
    assert made == [("c", 1), ("c", 3), ("big", 1), ("big", 2)]
    m.get("d", opener("d", 40), 40)  # pushes "c" out, and its views with it
    assert list(m.storages) == ["b", "d"] and "c" not in m.views


def test_repeated_descriptors_reuse_the_previous_result():
    """The same descriptors as the previous call resolve to its views without being decoded again; a
    change in any field, a dict the caller edited in place, an evicted storage or an 'shm' entry do not."""
    import base64

    from hotswap.weights.ipc import CudaIpcMappings, cuda_ipc_storage_key

    def desc(name: str, handle: bytes, offset: int) -> dict:
        return {"name": name, "dtype": "bfloat16", "shape": [2, 3], "stride": [3, 1], "storage_offset": offset, "kind": "cuda_ipc",
                "device": 0, "handle": base64.b64encode(handle).decode(), "storage_size": 64, "storage_handle_offset": 0}

    m = CudaIpcMappings(max_bytes=100)
    items = [desc("a", b"h1", 0), desc("b", b"h1", 6)]
    m.get(cuda_ipc_storage_key(items[0]), lambda: torch.UntypedStorage(64), 64)
    resolved = [("a", torch.ones(2, 3)), ("b", torch.zeros(2, 3))]
    m.remember(items, resolved)
    assert m.repeat([dict(d) for d in items]) is resolved  # equal descriptors, new objects (as after a queue or RPC)
    assert m.repeat([dict(d, event_handle="new", ref_counter_offset=7) for d in items]) is resolved  # made anew per share
    assert m.repeat([items[0], desc("b", b"h1", 12)]) is None  # another offset
    items[1]["shape"][0] = 1  # the caller reuses its dicts: the kept snapshot is not affected
    assert m.repeat(items) is None
    items[1]["shape"][0] = 2
    assert m.repeat(items) is resolved
    m.get(cuda_ipc_storage_key(desc("c", b"h2", 0)), lambda: torch.UntypedStorage(64), 64)  # evicts h1 (128 > 100)
    assert m.repeat(items) is None and not m.calls
    m.get(cuda_ipc_storage_key(items[0]), lambda: torch.UntypedStorage(64), 64)
    m.remember([*items, {**items[0], "kind": "shm"}], resolved)  # shm bytes may change under one name: never reused
    assert m.repeat([*items, {**items[0], "kind": "shm"}]) is None


def test_remembered_calls_keep_their_match_and_a_callers_list_is_checked_every_time(tiny_qwen3):
    """Each of several remembered calls (one per bucket of a push) resolves to its own views and keeps what
    the engine matched them to; a caller's own list is matched anew every call, even the same list object
    edited in place, and its match is never kept."""
    import base64

    from hotswap import Engine
    from hotswap.errors import CheckpointError
    from hotswap.weights.ipc import CudaIpcMappings, cuda_ipc_storage_key

    def desc(name: str, offset: int) -> dict:
        return {"name": name, "dtype": "float32", "shape": [2], "stride": [1], "storage_offset": offset, "kind": "cuda_ipc",
                "device": 0, "handle": base64.b64encode(b"h").decode(), "storage_size": 64, "storage_handle_offset": 0}

    m = CudaIpcMappings(max_bytes=100)
    m.get(cuda_ipc_storage_key(desc("a", 0)), lambda: torch.UntypedStorage(64), 64)
    buckets = [[desc("a", 0), desc("b", 2)], [desc("c", 4), desc("d", 6)]]
    views = [[(d["name"], torch.zeros(2)) for d in b] for b in buckets]
    for b, v in zip(buckets, views):
        m.remember(b, v)
        assert m.last_call.resolved is v
    for b, v in zip(buckets, views):  # a push of two buckets, repeated: both calls are remembered
        assert m.repeat([dict(d) for d in b]) is v and m.last_call.resolved is v
    assert m.repeat([desc("a", 0), desc("b", 4)]) is None and m.last_call is None

    with Engine(str(tiny_qwen3), device="cpu", dtype="float32") as engine:
        wu, wm = engine.scheduler.weight_updater, engine.model_runner.weight_map
        named = [(n, torch.zeros(wm.slots[n].hf_shape)) for n in wm.names]
        from hotswap.weights.sources.tensor import match_named

        def match(pairs):
            return match_named(pairs, wm, m, wu.tensor_plans)

        m.remember(buckets[0], named)  # stands in for the views of a remembered call
        first = match(named)
        assert first.trusted and match(named) is first and m.last_call.matched is first
        m.last_call = None  # a call that was not a repeat: matched anew, not kept
        again = match(named)
        assert again is not first and not again.trusted
        caller = list(named)
        caller[0] = (caller[0][0], torch.zeros(3))  # a caller's list edited in place is checked again
        with pytest.raises(CheckpointError, match="shape mismatch"):
            match(caller)


def test_a_push_of_many_buckets_is_remembered_whole(tiny_qwen3):
    """A push visits its buckets in the same order every step, so the per-call caches (copy plans, remembered
    IPC calls) must hold a whole push: Qwen3-30B-A3B in 512 MiB buckets is 99 calls, and with room for 64 the
    least recently used entry was always the next one needed: every call of every step missed."""
    import base64
    import itertools

    from hotswap import Engine
    from hotswap.weights.ipc import CudaIpcMappings, cuda_ipc_storage_key
    from hotswap.wire.buckets import BUCKET_CALLS_REMEMBERED

    calls = 120  # more than the old bound of 64, as a 30B-A3B push is
    assert BUCKET_CALLS_REMEMBERED >= calls

    def desc(name: str, offset: int) -> dict:
        return {"name": name, "dtype": "float32", "shape": [2], "stride": [1], "storage_offset": offset, "kind": "cuda_ipc",
                "device": 0, "handle": base64.b64encode(b"h").decode(), "storage_size": 1 << 12, "storage_handle_offset": 0}

    m = CudaIpcMappings(max_bytes=1 << 20)
    m.get(cuda_ipc_storage_key(desc("w0", 0)), lambda: torch.UntypedStorage(1 << 12), 1 << 12)
    pushes = [[desc(f"w{i}", 2 * i)] for i in range(calls)]
    views = [[(f"w{i}", torch.zeros(2))] for i in range(calls)]
    for b, v in zip(pushes, views):
        m.remember(b, v)
    assert all(m.repeat([dict(d) for d in b]) is v for b, v in zip(pushes, views))  # the next step: every call a hit

    with Engine(str(tiny_qwen3), device="cpu", dtype="float32") as engine:
        plans, wm = engine.scheduler.weight_updater.tensor_plans, engine.model_runner.weight_map
        names = list(wm.names)
        buckets = [list(pair) for pair in itertools.combinations(names, 2)][:calls]  # distinct bucket name sets
        assert len(buckets) == calls
        pairs = [[(n, torch.zeros(wm.slots[n].hf_shape)) for n in b] for b in buckets]
        first = [plans.match(wm, p).plan for p in pairs]
        assert all(plans.match(wm, p).plan is plan for p, plan in zip(pairs, first))  # the second step reuses every plan


def test_in_process_pairs_accept_tensor_subclasses_and_refuse_other_values():
    from hotswap.weights.ipc_grouped import _tensor_pairs

    items = [("a", torch.nn.Parameter(torch.zeros(2))), ("b", torch.zeros(3))]
    assert _tensor_pairs(items) is items
    assert _tensor_pairs([("a", torch.zeros(2)), ("b", [1.0, 2.0])]) is None
    assert _tensor_pairs([("a", torch.zeros(2)), (7, torch.zeros(2))]) is None
