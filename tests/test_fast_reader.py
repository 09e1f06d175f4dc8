"""The parallel safetensors reader (weights/fast_reader.py) loads bit-exactly: sharded checkpoints,
small staging windows that cut tensors into many pieces, dtype conversion, tensor-parallel slices along
either dimension; a fault mid-read rolls the update back. CPU here; the CUDA strategies run on the GPU."""

from __future__ import annotations

import pytest
import torch
from engine_support import fail_disk_read
from safetensors.torch import load_file

from hotswap import Engine
from hotswap.config import ModelConfig
from hotswap.errors import CheckpointError
from hotswap.models.decoder import CausalLM
from hotswap.models.parallel import TPInfo
from hotswap.weights import fast_reader
from hotswap.weights.fast_reader import ReaderOptions, ReadPlanCache, load_checkpoint, plan_tasks, run_read
from hotswap.weights.loader import plan_checkpoint
from hotswap.weights.mapping import WeightMap
from hotswap.weights.safetensors_io import checkpoint_files
from hotswap.wire.checksum import state_dict_manifest


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(path):
        out.update(load_file(str(f)))
    return out


def fresh_map(path, dtype=None, tp=TPInfo(), device="cpu") -> WeightMap:
    cfg = ModelConfig.from_pretrained(path)
    if dtype is not None:
        cfg.torch_dtype = dtype
    with torch.device(device):
        model = CausalLM(cfg, tp)
    for p in model.parameters():
        p.data.fill_(float("nan"))  # poison: every element must be written
    return WeightMap(model)


def assert_loaded(wm: WeightMap, ref: dict[str, torch.Tensor]) -> None:
    for name, slot in wm.slots.items():
        want = slot.spec.src_view(ref[name]).to(slot.dtype)
        assert torch.equal(slot.dest.cpu(), want.cpu()), name


@pytest.mark.parametrize("threads,staging", [(1, 1 << 20), (4, 16 * 4096), (3, 8 * 4096)])
def test_sharded_bit_exact(tiny_qwen3_sharded, threads, staging):
    assert len(checkpoint_files(tiny_qwen3_sharded)) > 1
    wm = fresh_map(tiny_qwen3_sharded)
    stats = load_checkpoint(wm, tiny_qwen3_sharded, ReaderOptions(threads=threads, staging_bytes=staging))
    ref = checkpoint_tensors(tiny_qwen3_sharded)
    assert_loaded(wm, ref)
    assert stats.nbytes == sum(t.numel() * t.element_size() for t in ref.values())
    assert stats.strategy == "plain"


def test_windows_cut_tensors_into_pieces(tiny_qwen3):
    wm = fresh_map(tiny_qwen3)
    plan = plan_checkpoint(wm, tiny_qwen3)
    chunk = 4096
    _, tasks, total = plan_tasks(plan, chunk)
    assert total == sum(info.nbytes for info, _ in plan)
    assert sum(p.nbytes for t in tasks for p in t.pieces) == total
    for t in tasks:  # a task never spans two windows, and its pieces lie inside it
        assert t.start // chunk == (t.end - 1) // chunk
        assert all(t.start <= p.start and p.start + p.nbytes <= t.end for p in t.pieces)
    assert any(len({id(p.slot) for p in t.pieces}) > 1 for t in tasks)  # small tensors share a window
    assert len(tasks) > len({id(p.slot) for t in tasks for p in t.pieces}) / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_conversion(tiny_qwen3_sharded, dtype):
    wm = fresh_map(tiny_qwen3_sharded, dtype=dtype)
    load_checkpoint(wm, tiny_qwen3_sharded, ReaderOptions(threads=2, staging_bytes=8 * 4096))
    assert_loaded(wm, checkpoint_tensors(tiny_qwen3_sharded))


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_slices(tiny_qwen3, rank):
    """Rank `rank` of 2: q/k/v, gate/up and the vocab rows are dim-0 slices (contiguous bytes), o_proj and
    down_proj dim-1 slices (rows through staging, narrowed)."""
    wm = fresh_map(tiny_qwen3, tp=TPInfo(rank=rank, size=2))
    assert any(s.spec.src_dim == 1 and not s.is_full for s in wm.slots.values())
    assert any(s.spec.src_dim == 0 and not s.is_full for s in wm.slots.values())
    load_checkpoint(wm, tiny_qwen3, ReaderOptions(threads=3, staging_bytes=8 * 4096))
    assert_loaded(wm, checkpoint_tensors(tiny_qwen3))


def test_engine_disk_update_through_reader(tiny_qwen3_sharded, tiny_qwen3, tmp_path):
    with Engine(str(tiny_qwen3_sharded), device="cpu", page_size=4, weight_load_threads=3, weight_load_staging_bytes=6 * 4096) as eng:
        assert eng.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_sharded))).success
        res = eng.update_weights_from_disk(str(tiny_qwen3))
        assert res.success, res.message
        assert eng.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3))).success
        assert eng.scheduler.weight_updater.last_read.strategy == "plain"


@pytest.mark.parametrize("fail_at", [0, 7, 30])
def test_mid_read_fault_rolls_back(tiny_qwen3, tiny_qwen3_sharded, monkeypatch, fail_at):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_load_threads=4, weight_load_staging_bytes=8 * 4096) as eng:
        before = eng.check_weights("checksum").digest
        version = eng.weight_version
        real = fail_disk_read(monkeypatch, at=fail_at)
        res = eng.update_weights_from_disk(str(tiny_qwen3_sharded))
        assert not res.success and "injected I/O error" in res.message and res.rolled_back
        assert eng.check_weights("checksum").digest == before and eng.weight_version == version
        monkeypatch.setattr(fast_reader, "_read_into", real)
        assert eng.update_weights_from_disk(str(tiny_qwen3_sharded)).success


def test_nan_checkpoint_refused_when_checked(tiny_qwen3, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_qwen3, bad)
    tensors = checkpoint_tensors(tiny_qwen3)
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, check_weights_finite=True) as eng:
        before = eng.check_weights("checksum").digest
        res = eng.update_weights_from_disk(str(bad))
        assert not res.success and name in res.message and res.rolled_back
        assert eng.check_weights("checksum").digest == before


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["pinned", "register", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_strategies_bit_exact(tiny_qwen3_sharded, strategy, dtype):
    wm = fresh_map(tiny_qwen3_sharded, dtype=dtype, device="cuda")
    stats = load_checkpoint(wm, tiny_qwen3_sharded, ReaderOptions(threads=3, staging_bytes=8 * 4096, strategy=strategy))
    assert stats.strategy == strategy and stats.fell_back is None, stats
    assert_loaded(wm, checkpoint_tensors(tiny_qwen3_sharded))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["pinned", "register"])
def test_cuda_engine_disk_update_fault_rolls_back(tiny_qwen3, tiny_qwen3_sharded, monkeypatch, strategy):
    """Originals partly on the device, partly in the pinned host arena (a small device budget), saved on a
    side stream that the reader's copies wait for; a fault after some copies restores them exactly."""
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32", num_pages=256, weight_load_strategy=strategy,
                weight_load_threads=3, weight_load_staging_bytes=8 * 4096, rollback_device_budget_bytes=64 * 1024) as eng:
        before = eng.check_weights("checksum").digest
        if strategy == "pinned":
            fail_disk_read(monkeypatch, at=6)
        else:
            real, calls = fast_reader._CudaLoad._copy_registered, iter(range(10**6))

            def failing(self, task, stream, pending):
                if next(calls) == 6:
                    raise OSError("injected I/O error")
                return real(self, task, stream, pending)

            monkeypatch.setattr(fast_reader._CudaLoad, "_copy_registered", failing)
        res = eng.update_weights_from_disk(str(tiny_qwen3_sharded))
        assert not res.success and "injected I/O error" in res.message and res.rolled_back
        assert eng.check_weights("checksum").digest == before
        monkeypatch.undo()
        res = eng.update_weights_from_disk(str(tiny_qwen3_sharded))
        assert res.success, res.message
        read = eng.scheduler.weight_updater.last_read
        assert read.strategy == strategy and read.fell_back is None
        assert eng.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_sharded))).success


@pytest.mark.gpu
def test_cuda_tensor_session_rollback(tiny_qwen3, tiny_qwen3_v2):
    """The grouped tensor copies inside a session; a refused second bucket restores the first exactly."""
    new = {k: v.cuda() for k, v in checkpoint_tensors(tiny_qwen3_v2).items()}
    names = sorted(new)
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32", num_pages=256, rollback_device_budget_bytes=64 * 1024) as eng:
        before = eng.check_weights("checksum").digest
        assert eng.begin_weight_update().success
        assert eng.update_weights_from_tensor([(n, new[n]) for n in names[: len(names) // 2]]).success
        assert eng.update_weights_from_tensor([(n, new[n]) for n in names[: len(names) // 2]]).success  # cached plan
        bad = [(n, new[n]) for n in names[len(names) // 2 :]]
        bad[0] = (bad[0][0], torch.zeros(3, device="cuda"))
        assert not eng.update_weights_from_tensor(bad).success
        assert not eng.end_weight_update().success
        assert eng.check_weights("checksum").digest == before
        res = eng.update_weights_from_tensor([(n, new[n]) for n in names])
        assert res.success, res.message
        assert eng.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))).success


def test_read_plans_are_reused_for_a_new_folder_with_the_same_layout(tiny_qwen3, tmp_path):
    """A checkpoint saved to a new folder with the same layout reuses the validated tasks (read from the new
    files); a different layout is planned and checked anew."""
    import shutil

    from safetensors.torch import save_file

    wm = fresh_map(tiny_qwen3)
    cache = ReadPlanCache()
    opts = ReaderOptions(threads=2, staging_bytes=8 * 4096)
    step1 = tmp_path / "step1"
    shutil.copytree(tiny_qwen3, step1)
    # a file holding only ignored entries sorts first: the plan reads none of it, and must not mistake it for the weights
    save_file({"model.rotary_emb.inv_freq": torch.ones(4)}, str(step1 / "a-extra.safetensors"))
    first = cache.prepare(wm, step1, opts)
    copy = tmp_path / "step2"
    shutil.copytree(step1, copy)
    again = cache.prepare(wm, copy, opts)
    assert again.tasks is first.tasks and all(f.parent == copy for f in again.files)
    run_read(again, opts)
    assert_loaded(wm, checkpoint_tensors(copy))
    assert cache.prepare(wm, copy, ReaderOptions(threads=4, staging_bytes=8 * 4096)).tasks is not first.tasks  # other windows
    other = tmp_path / "other"
    other.mkdir()
    tensors = checkpoint_tensors(tiny_qwen3)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        cache.prepare(wm, other, opts)


def test_a_truncated_header_is_refused_by_name_not_cached(tiny_qwen3, tmp_path):
    import struct

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b'{"x": 1}')
    cache = ReadPlanCache()
    with pytest.raises(CheckpointError, match="truncated"):
        cache.prepare(fresh_map(tiny_qwen3), bad, ReaderOptions(threads=2, staging_bytes=8 * 4096))
    assert not cache.plans


def test_read_plan_lists_slots_in_the_order_reads_reach_them(tiny_qwen3):
    """Rollback saves follow this order (device budget first): a slot read early must be saved early."""
    from hotswap.weights.fast_reader import prepare_read

    plan = plan_checkpoint(fresh_map(tiny_qwen3), tiny_qwen3)[::-1]  # a plan not in file order
    read = prepare_read(plan, ReaderOptions(threads=2, staging_bytes=8 * 4096))
    assert [s.hf_name for s in read.slots] != [slot.hf_name for _, slot in plan]
    first_task = {}  # slot -> the first task (window) that reads it; pieces of one window land together
    for i, t in enumerate(read.tasks):
        for p in t.pieces:
            first_task.setdefault(p.slot.hf_name, i)
    order = [first_task[s.hf_name] for s in read.slots]
    assert order == sorted(order)
    assert {s.hf_name for s in read.slots} == {slot.hf_name for _, slot in plan}
