"""A hostile or buggy trainer against every weight transport, over the Engine API and over HTTP.

Each bad update must be refused with a message naming what was wrong while the served weights stay
bit-for-bit as they were (checksum digest), the weight version stays, the engine still gives the baseline
greedy answer, and nothing waits past a bounded timeout. A good update right after must work (no open
session, held pause or half-filled staging left behind): it loads only q_proj of the fused qkv and only
gate_proj of the fused gate_up, one of them as float64, and must change exactly those slices.

Transports: in-process tensors, shared-memory descriptors, SGLang's serialized_named_tensors (a list of
pairs, verl's LocalSerializedTensor, flattened_bucket), torch.distributed over gloo (a trainer process,
one broadcast per tensor or one flattened bucket), checkpoint-engine (a fake parameter server over real
ZMQ) and disk.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import torch
import torch.multiprocessing as mp
from hf_reference import greedy_ids, prompt_ids
from safetensors.torch import save_file
from test_checkpoint_engine_ipc import CPU_SOURCE, FakeParameterServer
from test_sglang_payloads import LocalSerializedTensor, flattened_bucket, serialize, sglang_names  # noqa: F401 - a fixture
from trainer_support import CTX, broadcaster_main, checkpoint_tensors

from hotswap import Engine, HotswapError
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread
from hotswap.trainer import free_port
from hotswap.wire.buckets import flatten_bucket
from hotswap.wire.checksum import state_dict_manifest
from hotswap.wire.ipc import SharedMemoryBucket

PROMPTS = [prompt_ids(1, 9)]
OP_TIMEOUT_S = 2.0  # weight_session_timeout_s: how long a collective or a silent parameter server is waited for
GROUP = "refusals"
Q, K, V = (f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")
GATE, UP, DOWN = (f"model.layers.1.mlp.{x}_proj.weight" for x in ("gate", "up", "down"))


@dataclass
class Rig:
    engine: Engine
    client: httpx.Client
    v1: dict[str, torch.Tensor]
    v2: dict[str, torch.Tensor]
    digest: str
    greedy: list[list[int]]
    commands: object = None  # the trainer process's command queue (broadcaster_main)
    events: object = None
    group: str = GROUP

    def trainer(self, cmd: tuple, expect: str = "sent", timeout: float = 20.0):
        self.commands.put(cmd)
        return self.event(expect, timeout)

    def event(self, expect: str, timeout: float = 20.0):
        kind, payload = self.events.get(timeout=timeout)
        assert kind == expect, (kind, payload)
        return payload

    def join(self, name: str) -> None:
        port = free_port()
        self.commands.put(("join", port, name, 10))
        res = self.engine.init_weights_update_group("127.0.0.1", port, 1, 2, group_name=name, backend="gloo", timeout_s=10)
        assert res.success, res.message
        assert self.event("joined") == name
        self.group = name

    def assert_unchanged(self, what: str) -> None:
        """The served weights, version and greedy answer are the baseline's."""
        assert self.engine.check_weights("checksum").digest == self.digest, f"{what}: the weights changed"
        assert self.engine.weight_version == "default", f"{what}: the version changed to {self.engine.weight_version!r}"
        assert greedy_ids(self.engine, PROMPTS) == self.greedy, f"{what}: the greedy answer changed"

    def restore(self) -> None:
        res = self.engine.update_weights_from_tensor(list(self.v1.items()), weight_version="default")
        assert res.success, res.message
        self.assert_unchanged("restore")


@pytest.fixture(scope="module")
def rig(tiny_qwen3, tiny_qwen3_v2):
    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")  # CPU tensors in SGLang payloads travel as named /dev/shm objects
    engine = Engine(str(tiny_qwen3), device="cpu", page_size=4, check_weights_finite=True, weight_session_timeout_s=OP_TIMEOUT_S)
    engine.scheduler.weight_updater.ipc_source = CPU_SOURCE
    srv = ServerThread(create_app(engine)).start()
    commands, events = CTX.Queue(), CTX.Queue()
    trainer = CTX.Process(target=broadcaster_main, args=(commands, events), daemon=True)
    trainer.start()
    rig = Rig(engine, httpx.Client(base_url=srv.url, timeout=30), checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2),
              engine.check_weights("checksum").digest, greedy_ids(engine, PROMPTS), commands, events)
    rig.join(GROUP)
    yield rig
    commands.put(None)
    trainer.join(10)
    if trainer.is_alive():
        trainer.kill()
    rig.client.close()
    srv.stop()
    engine.shutdown()
    mp.set_sharing_strategy(before)


@pytest.fixture(autouse=True)
def baseline(rig):
    """Each test starts from the baseline even when the one before failed halfway (no cascade of failures)."""
    yield
    while not rig.events.empty():
        rig.events.get()
    engine = rig.engine
    engine.continue_generation()
    engine.end_weight_update(abort=True)
    engine.resume_memory_occupation()
    if engine.check_weights("checksum").digest != rig.digest or engine.weight_version != "default":
        rig.restore()
    group = engine.scheduler.weight_updater.groups.groups.get(rig.group)
    if group is None or group.broken is not None:  # a failed test lost lockstep: start a fresh group
        engine.destroy_weights_update_group(rig.group)
        rig.join(f"{GROUP}-{time.monotonic_ns()}")


# ---- sending one update by each transport ---------------------------------------------------------------


@dataclass
class Reply:
    success: bool
    message: str
    status: int | None = None  # HTTP status, None over the Engine API


def _reply(out) -> Reply:
    if isinstance(out, httpx.Response):
        body = out.json()
        return Reply(body["success"], body["message"], out.status_code)
    return Reply(out.success, out.message)


def _tensor_update(rig: Rig, http: bool, version: str | None, **body) -> Reply:
    if http:
        return _reply(rig.client.post("/update_weights_from_tensor", json={**body, "weight_version": version}))
    return _reply(rig.engine.update_weights_from_tensor(**body, weight_version=version))


def _sid(session_id: str | None) -> dict:
    """`session_id=` when the call names a begin_weight_update session (left out otherwise, as SGLang's callers do)."""
    return {} if session_id is None else {"session_id": session_id}


def send(rig: Rig, transport: str, named: list[tuple[str, torch.Tensor]], http: bool, version: str | None = None,
         session_id: str | None = None) -> Reply:
    if transport == "tensor":
        return _reply(rig.engine.update_weights_from_tensor(named, weight_version=version, **_sid(session_id)))
    if transport == "shm":
        with SharedMemoryBucket(named, token=rig.engine.get_ipc_token()) as bucket:
            return _tensor_update(rig, http, version, named_tensors=bucket.descriptors, **_sid(session_id))
    if transport in ("serialized", "local_serialized", "flattened_bucket"):
        if transport == "serialized":
            obj = [(n, t.clone()) for n, t in named]
        elif transport == "local_serialized":  # verl: one pickled tensor per TP rank inside each pair
            obj = [(n, LocalSerializedTensor(values=[serialize(t.clone())])) for n, t in named]
        else:
            obj = flattened_bucket(named) if named else {"flattened_tensor": torch.empty(0, dtype=torch.uint8), "metadata": []}
        payload = serialize(obj, output_str=True)
        return _tensor_update(rig, http, version, serialized_named_tensors=[payload],
                              load_format="flattened_bucket" if transport == "flattened_bucket" else None, **_sid(session_id))
    if transport in ("distributed", "distributed_flat"):
        flat = transport == "distributed_flat"
        if named:
            rig.commands.put(("send", [flatten_bucket(named, dtype=None, device=torch.device("cpu"))] if flat else [t.contiguous() for _, t in named]))
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": rig.group, "weight_version": version,
                "load_format": "flattened_bucket" if flat else None, **_sid(session_id)}
        out = _reply(rig.client.post("/update_weights_from_distributed", json=body) if http
                     else rig.engine.update_weights_from_distributed(**body))
        if named:
            rig.event("sent")  # lockstep held: the trainer's broadcast completed even for a refused bucket
        return out
    if transport == "checkpoint_engine":
        return push_checkpoint_engine(rig, FakeParameterServer([named]), http, version, session_id)
    raise ValueError(transport)


def push_checkpoint_engine(rig: Rig, server: FakeParameterServer, http: bool, version: str | None = None,
                           session_id: str | None = None) -> Reply:
    replies = []

    def request(paths):
        handles = dict(paths)
        body = {"zmq_handles": handles, "weight_version": version, **_sid(session_id)}
        replies.append(_reply(rig.client.post("/update_weights_from_ipc", json=body) if http else rig.engine.update_weights_from_ipc(**body)))

    server.update(request)
    return replies[0]


TRANSPORTS = [(t, api) for t in ("tensor", "shm", "serialized", "local_serialized", "flattened_bucket", "distributed", "distributed_flat",
                                 "checkpoint_engine") for api in ("engine", "http") if (t, api) != ("tensor", "http")]


def bad_updates(v2: dict[str, torch.Tensor]) -> dict[str, tuple[list, str]]:
    """name -> (named tensors, what the refusal must say). The good tensor first: it must not be copied either."""
    nan, inf = torch.full_like(v2[Q], float("nan")), v2[Q].clone()
    inf[3, 5] = float("inf")
    return {
        "wrong shape": ([(GATE, v2[GATE]), (Q, v2[Q][:, :32].contiguous())], f"shape mismatch for '{Q}': got [64, 32], expected [64, 64]"),
        "int tensor": ([(GATE, v2[GATE]), (Q, v2[Q].to(torch.int32))], "int32"),
        "bool tensor": ([(Q, v2[Q] > 0)], "bool"),
        "unknown name": ([(GATE, v2[GATE]), ("model.layers.0.mlp.nope.weight", torch.zeros(4))], "unknown parameter 'model.layers.0.mlp.nope.weight'"),
        "duplicate name": ([(Q, v2[Q]), (GATE, v2[GATE]), (Q, v2[Q])], f"parameter '{Q}' given twice"),
        "NaN": ([(GATE, v2[GATE]), (Q, nan)], f"tensor '{Q}' holds NaN or Inf"),
        "Inf": ([(Q, inf)], f"tensor '{Q}' holds NaN or Inf"),
        "path trick": ([("model.layers.0/../../../etc/passwd", torch.zeros(4))], "unknown parameter 'model.layers.0/../../../etc/passwd'"),
        "fused name": ([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(128, 64))], "unknown parameter"),
    }


def good_update(rig: Rig, transport: str, http: bool) -> None:
    """q_proj alone of the fused qkv and gate_proj alone of gate_up (sent as float64): exactly those slices change."""
    res = send(rig, transport, [(Q, rig.v2[Q]), (GATE, rig.v2[GATE].double())], http, version="good")
    assert res.success, res.message
    assert res.status in (None, 200)
    expected = {**rig.v1, Q: rig.v2[Q], GATE: rig.v2[GATE]}
    check = rig.engine.check_weights("checksum", expected=state_dict_manifest(expected))
    assert check.success, check.message
    assert rig.engine.weight_version == "good"
    rig.restore()


@pytest.mark.usefixtures("sglang_names")
@pytest.mark.parametrize("transport, api", TRANSPORTS)
def test_bad_updates_are_refused_and_change_nothing(rig, transport, api):
    http = api == "http"
    for case, (named, needle) in bad_updates(rig.v2).items():
        start = time.monotonic()
        res = send(rig, transport, named, http, version="bad")
        assert not res.success, f"{case}: accepted"
        assert needle in res.message, f"{case}: {res.message}"
        assert res.status in (None, 400), f"{case}: HTTP {res.status}"
        assert time.monotonic() - start < 10, case
        rig.assert_unchanged(case)
    res = send(rig, transport, [], http)  # an empty update (slime pads ranks with empty buckets): nothing changes
    assert res.success, res.message
    rig.assert_unchanged("empty update")
    good_update(rig, transport, http)


def test_tensors_copy_would_fail_on_are_refused_before_any_copy(rig):
    """In process a trainer can hand over what no copy reads (sparse, nested, meta): refused up front, the
    good tensor before it not copied either."""
    cases = {"sparse": (rig.v2[Q].to_sparse(), "torch.sparse_coo tensor"), "meta": (torch.empty(64, 64, device="meta"), "meta tensor"),
             "nested": (torch.nested.nested_tensor([rig.v2[Q][0], rig.v2[Q][1]], layout=torch.jagged), "nested tensor")}
    for case, (t, needle) in cases.items():
        res = rig.engine.update_weights_from_tensor([(GATE, rig.v2[GATE]), (Q, t)], weight_version="bad")
        assert not res.success and f"tensor '{Q}' is a {needle}" in res.message, (case, res.message)
        rig.assert_unchanged(case)
        res = rig.engine.update_weights_from_tensor([(GATE, rig.v2[GATE]), (Q, rig.v2[Q])])  # the same names: a cached plan
        assert res.success, res.message
        res = rig.engine.update_weights_from_tensor([(GATE, rig.v1[GATE]), (Q, t)], weight_version="bad")
        assert not res.success and needle in res.message, (case, res.message)
        rig.restore()
    good_update(rig, "tensor", http=False)


# ---- metadata that lies about sizes and offsets ----------------------------------------------------------


def _flat_bucket_lie(lie: str):
    def tamper(bucket: dict) -> None:
        second = bucket["metadata"][1]
        if lie == "overlap":  # the second tensor claims the first one's bytes
            second.start_idx, second.end_idx = 0, second.numel
        elif lie == "past the end":
            second.start_idx += 1 << 20
            second.end_idx += 1 << 20
        else:  # numel and end_idx disagree with the shape
            second.end_idx -= 4
            second.numel -= 4
    return tamper


@pytest.mark.parametrize("lie, needle", [("overlap", f"'{K}' (from 0) overlaps '{Q}'"), ("past the end", "runs past the flat tensor"),
                                         ("short", "do not hold shape")])
@pytest.mark.parametrize("api", ["engine", "http"])
@pytest.mark.usefixtures("sglang_names")
def test_flattened_bucket_metadata_that_lies_is_refused(rig, lie, needle, api):
    bucket = flattened_bucket([(Q, rig.v2[Q]), (K, rig.v2[K])])
    _flat_bucket_lie(lie)(bucket)
    res = _tensor_update(rig, api == "http", "bad", serialized_named_tensors=[serialize(bucket, output_str=True)], load_format="flattened_bucket")
    assert not res.success and needle in res.message, res.message
    rig.assert_unchanged(lie)
    good_update(rig, "flattened_bucket", api == "http")


@pytest.mark.parametrize("lie, needle", [("offset past the end", "runs past the end of shared-memory block"),
                                         ("overlap", "overlaps"), ("negative offset", "negative offset"),
                                         ("vanished block", "does not exist"), ("path in the block name", "invalid shared-memory block name"),
                                         ("another engine's block", "was not made for this engine"),
                                         ("shape larger than the block", "runs past the end")])
@pytest.mark.parametrize("api", ["engine", "http"])
def test_shared_memory_descriptors_that_lie_are_refused(rig, lie, needle, api):
    bucket = SharedMemoryBucket([(GATE, rig.v2[GATE]), (Q, rig.v2[Q])], token=rig.engine.get_ipc_token())
    try:
        d = bucket.descriptors[1]
        if lie == "offset past the end":
            d["offset"] = bucket.nbytes
        elif lie == "overlap":
            d["offset"] = 0  # the block's bytes of gate_proj, read again as q_proj
        elif lie == "negative offset":
            d["offset"] = -4
        elif lie == "vanished block":
            bucket.close()
        elif lie == "path in the block name":
            d["shm_name"] = f"hotswap_{rig.engine.get_ipc_token()}_/../../dev/shm/other"
        elif lie == "another engine's block":
            d["shm_name"] = "hotswap_0123456789abcdef_0011"
        else:
            d["shape"] = [10**9, 10**9]
        res = _tensor_update(rig, api == "http", "bad", named_tensors=bucket.descriptors)
    finally:
        bucket.close()
    assert not res.success and needle in res.message, res.message
    rig.assert_unchanged(lie)
    good_update(rig, "shm", api == "http")


def _ce_lie(lie: str):
    def tamper(i: int, metas: list[dict]) -> None:
        if lie == "overlap" and i == 0:
            metas[1]["offset"] = metas[0]["offset"]
        elif lie == "offset past the buffer" and i == 0:
            metas[1]["offset"] = 1 << 30
    return tamper


@pytest.mark.parametrize("lie, needle", [("overlap", "overlaps"), ("offset past the buffer", "run past the"),
                                         ("duplicate across buckets", f"parameter '{Q}' was given in an earlier bucket")])
@pytest.mark.parametrize("api", ["engine", "http"])
def test_checkpoint_engine_buckets_that_lie_are_refused(rig, lie, needle, api):
    buckets = [[(Q, rig.v2[Q]), (K, rig.v2[K])], [(GATE, rig.v2[GATE])]]
    if lie == "duplicate across buckets":
        buckets[1].append((Q, torch.zeros_like(rig.v2[Q])))
    res = push_checkpoint_engine(rig, FakeParameterServer(buckets, tamper=_ce_lie(lie)), api == "http", version="bad")
    assert not res.success and needle in res.message, res.message
    rig.assert_unchanged(lie)
    good_update(rig, "checkpoint_engine", api == "http")


def test_parameter_server_that_never_sends_times_out(rig):
    """zmq_handles naming a socket no parameter server serves: the engine waits at most its session timeout."""
    start = time.monotonic()
    r = rig.client.post("/update_weights_from_ipc", json={"zmq_handles": {CPU_SOURCE.device_key(None): "ipc://@hotswap-nobody-here.sock"},
                                                          "weight_version": "bad"})
    assert r.status_code == 400 and "no message from the parameter server" in r.json()["message"], r.text
    assert time.monotonic() - start < OP_TIMEOUT_S + 5
    rig.assert_unchanged("silent parameter server")
    good_update(rig, "checkpoint_engine", http=True)


# ---- disk -----------------------------------------------------------------------------------------------


def _write(path, tensors: dict[str, torch.Tensor], src) -> str:
    path.mkdir()
    shutil.copy(src / "config.json", path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


def _lying_header(path, src, v2) -> str:
    """A checkpoint whose header points o_proj's data_offsets at q_proj's bytes."""
    p = _write(path, v2, src)
    f = path / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] = header[Q]["data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return p


def _index(path, src, v2, weight_map_of) -> str:
    """A sharded checkpoint whose index says `weight_map_of(names)`."""
    path.mkdir()
    shutil.copy(src / "config.json", path)
    save_file({k: v.contiguous() for k, v in v2.items()}, str(path / "model-1.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map_of(list(v2))}))
    return str(path)


def disk_cases(tmp, src, v2) -> dict[str, tuple[str, str]]:
    outside = tmp / "outside"
    outside.mkdir()
    save_file({Q: v2[Q]}, str(outside / "x.safetensors"))
    return {
        "wrong shape": (_write(tmp / "shape", {**v2, Q: v2[Q][:, :32]}, src), "shape mismatch"),
        "int tensor": (_write(tmp / "int", {**v2, Q: v2[Q].to(torch.int32)}, src), "int32"),
        "NaN": (_write(tmp / "nan", {**v2, Q: torch.full_like(v2[Q], float("nan"))}, src), "NaN or Inf"),
        "unknown name": (_write(tmp / "unknown", {**v2, "../../etc/passwd": torch.zeros(2)}, src), "unknown parameter '../../etc/passwd'"),
        "missing tensor": (_write(tmp / "partial", {k: v for k, v in v2.items() if k != Q}, src), f"checkpoint lacks parameter(s) ['{Q}']"),
        "overlapping data_offsets": (_lying_header(tmp / "overlap", src, v2), "overlaps"),
        "index names a shard outside": (_index(tmp / "trav", src, v2, lambda names: {**{n: "model-1.safetensors" for n in names},
                                                                                      Q: "../outside/x.safetensors"}),
                                        "not plain *.safetensors file names"),
        "index is not a map": (_index(tmp / "list", src, v2, lambda names: names), "not a valid safetensors index"),
        "not a checkpoint": (str(outside.parent / "nowhere"), "is not a directory"),
        "empty folder": (str(_empty(tmp / "empty")), "holds no *.safetensors files"),
    }


def _empty(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("api", ["engine", "http"])
def test_bad_checkpoints_are_refused_and_change_nothing(rig, api, tiny_qwen3, tmp_path):
    for case, (path, needle) in disk_cases(tmp_path, tiny_qwen3, rig.v2).items():
        if api == "http":
            res = _reply(rig.client.post("/update_weights_from_disk", json={"model_path": path, "weight_version": "bad"}))
            if case == "not a checkpoint":
                needle = "does not exist"  # the route checks the folder before the engine reads it
        else:
            res = _reply(rig.engine.update_weights_from_disk(path, weight_version="bad"))
        assert not res.success and needle in res.message, f"{case}: {res.message}"
        rig.assert_unchanged(case)
    good = _write(tmp_path / "good", {**rig.v1, Q: rig.v2[Q], GATE: rig.v2[GATE].double()}, tiny_qwen3)
    res = rig.engine.update_weights_from_disk(good, weight_version="good")
    assert res.success, res.message
    assert rig.engine.check_weights("checksum", expected=state_dict_manifest({**rig.v1, Q: rig.v2[Q], GATE: rig.v2[GATE]})).success
    rig.restore()


# ---- torch.distributed: metadata, silent peers, groups ---------------------------------------------------


@pytest.mark.parametrize("api", ["engine", "http"])
def test_distributed_metadata_refused_before_receiving(rig, api):
    """Metadata that cannot be received is refused at once (the trainer sends nothing for it here). The engine
    cannot know that: lockstep with a trainer that did broadcast is lost, so the group it names is broken (see
    test_distributed_refusal_breaks_group.py) and a new one carries the good update."""
    cases = [
        (dict(names=[Q, K], dtypes=["float32"], shapes=[[64, 64]]), "differ in length"),
        (dict(names=[Q], dtypes=["complex128"], shapes=[[64, 64]]), "unknown dtype 'complex128'"),
        (dict(names=[Q], dtypes=["float32"], shapes=[[-1]]), "shape"),
        (dict(names=[Q], dtypes=["float32"], shapes=[[1 << 20, 1 << 20]]), "larger than the configured limit"),
        (dict(names=[Q], dtypes=["float32"], shapes=[[64, 64]], group_name="nope"), "no weights update group 'nope'"),
    ]
    for body, needle in cases:
        body = {"group_name": rig.group, **body}
        res = _reply(rig.client.post("/update_weights_from_distributed", json=body) if api == "http"
                     else rig.engine.update_weights_from_distributed(**body))
        assert not res.success and needle in res.message, (body, res.message)
        rig.assert_unchanged(needle)
        group = rig.engine.scheduler.weight_updater.groups.groups.get(rig.group)
        if group is not None and group.broken is not None:
            assert rig.engine.destroy_weights_update_group(rig.group).success
            rig.join(f"{GROUP}-{api}-{len(needle)}")
    good_update(rig, "distributed", api == "http")


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
@pytest.mark.parametrize("api", ["engine", "http"])
def test_trainer_broadcasting_less_than_announced_is_refused(rig, load_format, api):
    """gloo lets a broadcast shorter than the receiving buffer through: the request announces gate_proj and
    q_proj whole, the trainer sends only half of q_proj. Refused, nothing uninitialized loaded; lockstep held,
    so the same group carries a good update next."""
    sent = [(GATE, rig.v2[GATE]), (Q, rig.v2[Q][:32].contiguous())]
    rig.commands.put(("send", [flatten_bucket(sent, dtype=None, device=torch.device("cpu"))] if load_format else [t for _, t in sent]))
    body = {"names": [GATE, Q], "dtypes": ["float32", "float32"], "shapes": [[128, 64], [64, 64]], "group_name": rig.group,
            "weight_version": "bad", "load_format": load_format}
    res = _reply(rig.client.post("/update_weights_from_distributed", json=body) if api == "http"
                 else rig.engine.update_weights_from_distributed(**body))
    rig.event("sent")
    where = "the flattened bucket" if load_format else Q
    assert not res.success and f"the trainer broadcast fewer bytes than announced for ['{where}']" in res.message, res.message
    rig.assert_unchanged("short broadcast")
    good_update(rig, "distributed_flat" if load_format else "distributed", api == "http")


def test_distributed_group_lifecycle_refusals(rig):
    """Joining a name twice, destroying a missing group, and a trainer that never sends: each answers within
    bounds, and the group (or a new one) carries a good update afterwards."""
    res = rig.engine.init_weights_update_group("127.0.0.1", free_port(), 1, 2, group_name=rig.group, backend="gloo", timeout_s=5)
    assert not res.success and f"weights update group '{rig.group}' already exists" in res.message
    r = rig.client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1,
                                                            "world_size": 2, "group_name": rig.group, "backend": "gloo"})
    assert r.status_code == 400 and "already exists" in r.json()["message"]
    for bad, needle in [({"timeout_s": float("nan")}, "timeout_s must be positive"), ({"timeout_s": 1e308}, "at most 86400 s"),
                        ({"master_port": 70000}, "master_port must be a TCP port")]:
        args = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2, "group_name": "other",
                "backend": "gloo", "timeout_s": 5, **bad}
        res = rig.engine.init_weights_update_group(**args)
        assert not res.success and needle in res.message, (bad, res.message)
    good_update(rig, "distributed", http=False)  # the existing group is untouched
    res = rig.engine.destroy_weights_update_group("never-made")
    assert not res.success and "no weights update group named 'never-made'" in res.message
    r = rig.client.post("/destroy_weights_update_group", json={"group_name": "never-made"})
    assert r.status_code == 400 and "never-made" in r.json()["message"]

    start = time.monotonic()  # the trainer announces a bucket and never broadcasts it
    res = rig.engine.update_weights_from_distributed([Q], ["float32"], [[64, 64]], group_name=rig.group, weight_version="bad")
    waited = time.monotonic() - start
    assert not res.success and "receiving the bucket failed" in res.message and res.extra.received is False
    assert OP_TIMEOUT_S <= waited < OP_TIMEOUT_S + 5
    rig.assert_unchanged("silent trainer")
    res = rig.engine.update_weights_from_distributed([Q], ["float32"], [[64, 64]], group_name=rig.group)
    assert not res.success and "is broken" in res.message and "destroy it" in res.message
    assert rig.engine.destroy_weights_update_group(rig.group).success
    rig.join(f"{GROUP}-2")  # the trainer makes a new group; the engine joins it
    good_update(rig, "distributed_flat", http=True)


# ---- engine states: released weights, pause, sessions, racing updates -----------------------------------


@pytest.mark.parametrize("transport", ["tensor", "shm", "distributed", "checkpoint_engine"])
def test_update_while_the_weights_are_released_is_refused(rig, transport):
    assert rig.engine.release_memory_occupation().success
    try:
        res = send(rig, transport, [(Q, rig.v2[Q])], http=transport != "tensor", version="bad")
    finally:
        assert rig.engine.resume_memory_occupation().success
    assert not res.success and "released" in res.message, res.message
    rig.assert_unchanged("released")
    good_update(rig, transport, http=False)


def test_refused_update_during_a_pause_rolls_the_pause_back(rig):
    """A refused bucket fails the pause's session (later ones are refused, the earlier one rolled back);
    continue_generation ends it, and a good update then works."""
    assert rig.engine.pause_generation().success
    assert rig.engine.update_weights_from_tensor([(GATE, rig.v2[GATE])]).success
    res = rig.engine.update_weights_from_tensor([(Q, rig.v2[Q].to(torch.int32))], weight_version="bad")
    assert not res.success and "int32" in res.message and "marked failed" in res.message
    res = rig.engine.update_weights_from_tensor([(Q, rig.v2[Q])])
    assert not res.success and "already failed" in res.message
    assert rig.engine.continue_generation().success
    rig.assert_unchanged("pause")
    good_update(rig, "tensor", http=False)


def test_refused_bucket_in_an_explicit_session_leaves_nothing_behind(rig):
    assert rig.client.post("/begin_weight_update", json={}).json()["success"]
    r = rig.client.post("/begin_weight_update", json={})
    assert r.status_code == 400 and "already open" in r.json()["message"]
    assert send(rig, "shm", [(GATE, rig.v2[GATE])], http=True).success
    res = send(rig, "shm", [(Q, rig.v2[Q][:, :8].contiguous())], http=True)
    assert not res.success and "shape mismatch" in res.message
    r = rig.client.post("/end_weight_update", json={"weight_version": "bad"})
    assert r.status_code == 400 and "rolled back" in r.json()["message"]
    rig.assert_unchanged("session")
    good_update(rig, "shm", http=True)


# ---- session ids: a call that reaches the engine after its session ended --------------------------------


def begin(rig: Rig, http: bool) -> str:
    """Open a session; its id (the Engine's reply still unpacks as SGLang's `(success, message)`)."""
    if http:
        body = rig.client.post("/begin_weight_update", json={}).json()
        assert body["success"], body
        return body["session_id"]
    out = rig.engine.begin_weight_update()
    ok, message = out
    assert ok, message
    return out.session_id


def end(rig: Rig, http: bool, session_id: str, abort: bool = False, version: str | None = None) -> dict:
    body = {"weight_version": version, "abort": abort, "session_id": session_id}
    if http:
        r = rig.client.post("/end_weight_update", json=body)
        assert r.status_code == (200 if r.json()["success"] else 400)
        return r.json()
    return rig.engine.end_weight_update(**body).to_dict()


@pytest.mark.parametrize("api", ["engine", "http"])
def test_a_late_bucket_of_an_aborted_session_is_refused_by_every_transport(rig, api, tiny_qwen3_v2):
    """The trainer gave up and aborted its session; its buckets still in flight land afterwards, by every
    transport. Each is refused and changes nothing (weights, version, greedy answer); the distributed one
    still takes part in the broadcast it announces, so the group carries the next update."""
    http = api == "http"
    sid = begin(rig, http)
    assert send(rig, "shm", [(GATE, rig.v2[GATE])], http, session_id=sid).success
    assert end(rig, http, sid, abort=True)["rolled_back"]
    rig.assert_unchanged("aborted session")
    late_bucket = [(Q, rig.v2[Q]), (GATE, rig.v2[GATE])]
    for transport in ("tensor", "shm", "serialized", "distributed", "distributed_flat", "checkpoint_engine"):
        if transport == "tensor" and http:
            continue
        res = send(rig, transport, late_bucket, http, version="late", session_id=sid)
        assert not res.success and f"session '{sid}' is not open: it was aborted; weights unchanged" in res.message, (transport, res.message)
        assert res.status in (None, 400), transport
        rig.assert_unchanged(transport)
    body = {"model_path": str(tiny_qwen3_v2), "weight_version": "late", "session_id": sid}
    res = _reply(rig.client.post("/update_weights_from_disk", json=body) if http else rig.engine.update_weights_from_disk(**body))
    assert not res.success and "it was aborted" in res.message, res.message
    rig.assert_unchanged("disk")
    good_update(rig, "distributed", http)  # lockstep held through the refused broadcasts


@pytest.mark.parametrize("api", ["engine", "http"])
def test_a_late_bucket_of_session_one_leaves_session_two_whole(rig, api):
    """A retry opened session 2 while session 1's buckets (good ones, and one a validation refuses) were still
    in flight: they are refused without failing or rolling back session 2, a stale end or abort leaves it
    alone, and session 2 commits exactly its own bucket."""
    http = api == "http"
    s1 = begin(rig, http)
    assert send(rig, "shm", [(UP, rig.v2[UP])], http, session_id=s1).success
    assert end(rig, http, s1, abort=True)["success"]
    s2 = begin(rig, http)
    assert s2 != s1
    assert send(rig, "shm", [(Q, rig.v2[Q])], http, session_id=s2).success
    late_bucket = [(GATE, rig.v2[GATE]), (DOWN, rig.v2[DOWN])]
    for transport in ("shm", "distributed_flat", "checkpoint_engine"):
        late = send(rig, transport, late_bucket, http, session_id=s1)
        assert not late.success and "is not open: it was aborted" in late.message and "the open session is untouched" in late.message, \
            (transport, late.message)
    bad = send(rig, "shm", [(GATE, rig.v2[GATE][:, :8].contiguous())], http, session_id=s1)
    assert not bad.success and "shape mismatch" in bad.message and "is not open" in bad.message and "marked failed" not in bad.message
    out = end(rig, http, s1, abort=True)  # the old push's abort, late: a no-op, session 2 stays open
    assert out["success"] and not out["rolled_back"] and out["extra"]["session"] == "aborted"
    out = end(rig, http, s1, version="s1")  # a stale commit is refused
    assert not out["success"] and "nothing committed" in out["message"]
    assert rig.engine.get_load().paused  # session 2 still holds generation
    out = end(rig, http, s2, version="s2")
    assert out["success"] and out["num_tensors"] == 1, out
    check = rig.engine.check_weights("checksum", expected=state_dict_manifest({**rig.v1, Q: rig.v2[Q]}))
    assert check.success, check.message
    assert rig.engine.weight_version == "s2"
    out = end(rig, http, s2, abort=True)  # an abort never undoes a commit
    assert not out["success"] and out["extra"]["session"] == "committed" and rig.engine.weight_version == "s2"
    rig.restore()


def test_a_late_call_aborts_no_request_and_waits_for_none(rig):
    """A late call of an ended session is refused at once: its abort_all_requests aborts nothing, and it does
    not wait for running requests to drain (as a call that may run does)."""
    sid = begin(rig, http=False)
    assert end(rig, False, sid, abort=True)["success"]
    done = []
    params = {"max_new_tokens": 450, "temperature": 0.0, "ignore_eos": True}
    worker = threading.Thread(target=lambda: done.append(rig.engine.generate(input_ids=PROMPTS[0], sampling_params=params)))
    worker.start()
    deadline = time.monotonic() + 10
    while rig.engine.get_load().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    start = time.monotonic()
    res = rig.engine.update_weights_from_tensor([(Q, rig.v2[Q])], abort_all_requests=True, session_id=sid)
    refused_in = time.monotonic() - start
    running = rig.engine.get_load().num_running
    worker.join(60)
    assert not res.success and "is not open" in res.message
    assert running == 1 and refused_in < 0.5, (running, refused_in)  # refused while the request was still running
    assert done[0]["meta_info"]["finish_reason"]["type"] == "length" and len(done[0]["output_ids"]) == 450
    rig.assert_unchanged("late call")


def test_racing_updates_are_applied_one_at_a_time(rig):
    """Concurrent updates over HTTP (good, bad, good) never mix: each good one lands whole, the bad one changes
    nothing, and the weights served at the end are exactly those of the version they report."""
    pushes = {"v1-again": rig.v1, "v2": rig.v2, "bad": {**rig.v2, Q: rig.v2[Q][:, :8].contiguous()}}
    replies = {}

    def push(version: str) -> None:
        with SharedMemoryBucket(list(pushes[version].items()), token=rig.engine.get_ipc_token()) as bucket:
            replies[version] = rig.client.post("/update_weights_from_tensor", json={"named_tensors": bucket.descriptors,
                                                                                    "weight_version": version}).json()

    threads = [threading.Thread(target=push, args=(v,)) for v in pushes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert replies["v1-again"]["success"] and replies["v2"]["success"] and not replies["bad"]["success"]
    version = rig.engine.weight_version
    assert version in ("v1-again", "v2")
    assert rig.engine.check_weights("checksum", expected=state_dict_manifest(pushes[version])).success
    rig.restore()


# ---- reads and saves ------------------------------------------------------------------------------------


def test_bad_reads_and_saves_are_refused(rig, tmp_path):
    with pytest.raises(HotswapError, match="unknown parameter 'model.layers.9.mlp.up_proj.weight'"):
        rig.engine.get_weights_by_name("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(HotswapError, match="truncate_size must be a non-negative integer"):
        rig.engine.get_weights_by_name(Q, truncate_size=-1)
    assert len(rig.engine.get_weights_by_name(Q, truncate_size=10**9)) == 64  # past the end: the whole tensor, as slicing gives
    r = rig.client.post("/get_weights_by_name", json={"name": "../../etc/passwd"})
    assert r.status_code == 400 and "unknown parameter '../../etc/passwd'" in r.json()["message"]
    r = rig.client.post("/get_weights_by_name", json={"name": Q, "truncate_size": -5})
    assert r.status_code == 400 and "truncate_size" in r.json()["message"]
    for pattern in ("../../evil-{rank}.safetensors", "/tmp/evil-{part}.safetensors", "sub/evil.safetensors"):
        res = rig.engine.save_sharded_model(str(tmp_path / "save"), pattern=pattern)
        assert not res.success and "plain file names" in res.message, res.message
    r = rig.client.post("/save_sharded_model", json={"path": str(tmp_path / ".." / "escape")})
    assert r.status_code in (400, 403) and r.json()["success"] is False  # the server's policy allows no save root here
    assert not (tmp_path.parent / "escape").exists()
    rig.assert_unchanged("reads")


def test_payload_naming_a_vanished_torch_shm_object_is_refused(rig):
    """A CPU tensor shared by torch (file_system) whose /dev/shm object is gone by the time the engine opens it."""
    t = rig.v2[Q].clone().share_memory_()
    payload = serialize([(Q, t)])
    name = t.untyped_storage()._share_filename_cpu_()[1].decode()
    data = payload.replace(name.encode(), name[:-1].encode() + (b"9" if name[-1] != "9" else b"8"))  # the same length, another object
    res = rig.engine.update_weights_from_tensor(serialized_named_tensors=[base64.b64encode(data).decode()], weight_version="bad")
    assert not res.success and "does not exist" in res.message, res.message
    rig.assert_unchanged("vanished torch shm")


def test_moe_expert_then_whole_stack_then_a_bad_bucket_rolls_back_exactly(tiny_qwen3_moe, tiny_qwen3_moe_v2):
    """One expert alone (a partial set of a stacked tensor), then the whole stack, then a bad bucket in one
    session: the rollback restores every byte; checkpoint-engine refuses the same two forms in one update."""
    v2 = checkpoint_tensors(tiny_qwen3_moe_v2)
    expert = "model.layers.0.mlp.experts.3.gate_proj.weight"
    with Engine(str(tiny_qwen3_moe), device="cpu", page_size=4, weight_session_timeout_s=OP_TIMEOUT_S) as engine:
        engine.scheduler.weight_updater.ipc_source = CPU_SOURCE
        digest, greedy = engine.check_weights("checksum").digest, greedy_ids(engine, PROMPTS)
        stack = "model.layers.0.mlp.experts.gate_up_proj"
        whole = torch.tensor(engine.get_weights_by_name(stack, truncate_size=0)) + 1
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor([(expert, v2[expert])]).success
        assert engine.update_weights_from_tensor([(stack, whole)]).success
        res = engine.update_weights_from_tensor([(expert, v2[expert].to(torch.int64))])
        assert not res.success and "int64" in res.message
        assert not engine.end_weight_update().success
        assert engine.check_weights("checksum").digest == digest and greedy_ids(engine, PROMPTS) == greedy

        replies = []
        FakeParameterServer([[(expert, v2[expert])], [(stack, whole)]]).update(
            lambda paths: replies.append(engine.update_weights_from_ipc(dict(paths))))
        assert not replies[0].success and f"'{stack}' was given both whole and per expert" in replies[0].message
        assert engine.check_weights("checksum").digest == digest
        assert engine.update_weights_from_tensor([(expert, v2[expert])]).success  # and a good update works
        assert engine.get_weights_by_name(expert, truncate_size=0) == v2[expert].tolist()
