"""An update session's saved originals in the KV pool's bytes (`Scheduler.lend_kv_pool`, weights/rollback.py): when
no request holds a page, the originals copy on the device instead of to pinned host memory, the prefix cache is
emptied first (its KV is overwritten), and a rollback still restores the weights bit for bit. Requests paused in
place keep their pages: the pool is not lent, and their KV survives the update."""

from __future__ import annotations

import threading

import torch
from engine_support import make_engine

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
PROMPT = "Alice likes"


def new_weights(engine, seed: int) -> list[tuple[str, torch.Tensor]]:
    wm = engine.model_runner.weight_map
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.randn(tuple(wm.slots[n].hf_shape), generator=gen) * 0.05) for n in wm.names]


def weight_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters())


def test_a_rolled_back_session_saved_in_the_kv_pool_restores_every_weight_and_serves_as_before(tiny_qwen3):
    engine = make_engine(tiny_qwen3, num_pages=2048)
    try:
        assert engine.model_runner.kv_cache.kv.numel() * 4 > weight_bytes(engine)  # float32: the pool holds the weights
        first = engine.generate(PROMPT, GREEDY)  # its prompt's pages stay in the prefix cache
        before = engine.check_weights("checksum").digest
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(new_weights(engine, 1)).success
        rollback = engine.scheduler.sessions.session.rollback
        assert rollback.scratch_bytes >= weight_bytes(engine) and rollback.host_bytes == rollback.device_bytes == 0
        assert engine.end_weight_update(abort=True).success
        assert engine.check_weights("checksum").digest == before
        # the prefix cache was emptied when the pool was lent: the same prompt recomputes its KV, and agrees
        again = engine.generate(PROMPT, GREEDY)
        assert again["output_ids"] == first["output_ids"] and again["meta_info"]["cached_tokens"] == 0
        # a committed session serves the new weights
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(new_weights(engine, 2)).success
        assert engine.end_weight_update(weight_version="v2").success
        assert engine.check_weights("checksum").digest != before
        assert engine.generate(PROMPT, GREEDY)["meta_info"]["weight_version"] == "v2"
    finally:
        engine.shutdown()


def test_requests_paused_in_place_keep_their_pages_and_the_originals_go_to_the_host(tiny_qwen3):
    engine = make_engine(tiny_qwen3, num_pages=2048)
    try:
        reference = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=300))["output_ids"]
        engine.flush_cache()
        chunks: list[dict] = []
        started = threading.Event()

        def stream():
            for chunk in engine.generate(PROMPT, dict(GREEDY, max_new_tokens=300), stream=True, incremental_streaming_output=True):
                chunks.append(chunk)
                started.set()

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        assert started.wait(30)
        assert engine.pause_generation(mode="in_place").success
        before = engine.check_weights("checksum").digest
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(new_weights(engine, 3)).success
        rollback = engine.scheduler.sessions.session.rollback
        assert len(engine.scheduler.batcher.running) == 1  # frozen in place, holding its pages
        assert rollback.scratch_bytes == 0 and rollback.host_bytes >= weight_bytes(engine)
        assert engine.end_weight_update(abort=True).success
        assert engine.check_weights("checksum").digest == before
        assert engine.continue_generation().success
        worker.join(30)
        assert not worker.is_alive()
        assert sum((c["output_ids"] for c in chunks), []) == reference  # its KV survived, the weights came back
    finally:
        engine.shutdown()


def test_a_disk_read_failing_midway_is_undone_from_the_kv_pool(tiny_qwen3, tiny_qwen3_v2, monkeypatch):
    """A single update from disk saves what it overwrites too (the source can fail after the first copy): with the pool
    lent, an I/O error partway through the read still leaves every weight as it was."""
    from engine_support import fail_disk_read

    engine = make_engine(tiny_qwen3, num_pages=2048, weight_load_threads=2, weight_load_staging_bytes=8 * 4096)
    try:
        lent = []
        lend = engine.scheduler.sessions.lend_scratch
        engine.scheduler.sessions.lend_scratch = lambda: lent.append(lend()) or lent[-1]
        before = engine.check_weights("checksum").digest
        fail_disk_read(monkeypatch, at=5)
        res = engine.update_weights_from_disk(str(tiny_qwen3_v2))
        assert not res.success and "injected I/O error" in res.message and res.rolled_back
        assert len(lent) == 1 and lent[0] is not None and lent[0].numel() >= weight_bytes(engine)
        assert engine.check_weights("checksum").digest == before
    finally:
        engine.shutdown()
