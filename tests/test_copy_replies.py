"""A tensor update that commits on its own replies when its copies ran on the device, and the scheduler takes the
next call meanwhile (scheduler/copy_replies.py): replies go out in order and only once their copy completed, any
other control request waits for every copy, and a loop that stops answers every held reply. On the CPU the device
is a stand-in (events completed by hand); on a GPU calls sent back to back land the last one's bytes, each
reply after its copy."""

from __future__ import annotations

import threading
import time

import pytest

from hotswap import protocol as p
from hotswap.scheduler.copy_replies import CopyReplies


class HandEvent:
    """A copy's completion, set by the test."""

    def __init__(self) -> None:
        self.completed = False
        self.waited = 0

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.waited += 1
        self.completed = True


def replies_with(events: list[HandEvent]) -> CopyReplies:
    def mark() -> HandEvent:
        events.append(HandEvent())
        return events[-1]

    return CopyReplies(mark_done=mark)


def output(version: str) -> p.WeightUpdateOutput:
    return p.WeightUpdateOutput(success=True, message=f"updated to {version}", weight_version=version)


def test_replies_wait_for_their_copy_and_go_out_in_order():
    events: list[HandEvent] = []
    copies = replies_with(events)
    held = object()
    first = copies.defer(output("v1"), time.perf_counter(), keep_alive=held)
    second = copies.defer(output("v2"), time.perf_counter(), keep_alive=None)
    copies.settle()
    assert not first.done() and not second.done()
    events[1].completed = True  # the later copy completing first answers nothing: replies keep their order
    copies.settle()
    assert not first.done() and not second.done() and copies.pending[0].keep_alive is held
    events[0].completed = True
    copies.settle()
    assert first.result().weight_version == "v1" and second.result().weight_version == "v2"
    assert first.result().elapsed_s > 0 and not copies.pending  # what the copies read is let go with the reply


def test_waiting_for_the_oldest_stops_for_an_arriving_request():
    events: list[HandEvent] = []
    copies = replies_with(events)
    reply = copies.defer(output("v1"), time.perf_counter(), keep_alive=None)
    copies.wait_oldest(interrupted=lambda: True)  # the next bucket is queued: it is taken before the reply goes out
    assert not reply.done()
    threading.Timer(0.05, lambda: setattr(events[0], "completed", True)).start()
    copies.wait_oldest(interrupted=lambda: False)
    assert reply.result().success


def test_settle_all_waits_for_the_last_copy_and_fail_all_answers_the_rest():
    events: list[HandEvent] = []
    copies = replies_with(events)
    a, b = (copies.defer(output(v), time.perf_counter(), keep_alive=None) for v in ("v1", "v2"))
    copies.settle_all()
    assert events[0].waited == events[1].waited == 1
    assert a.result().success and b.result().success and not copies.pending
    c = copies.defer(output("v3"), time.perf_counter(), keep_alive=None)
    copies.fail_all("the engine was shut down")
    assert not c.result().success and "outcome unknown: the engine was shut down" in c.result().message and not copies.pending


@pytest.fixture
def held_copies(tiny_qwen3, monkeypatch):
    """A CPU engine whose tensor updates reply as a GPU engine's do (after their copies), the copies' completion in
    the test's hands: (engine, the events, one per call, in order)."""
    from engine_support import make_engine

    from hotswap.scheduler.weight_updater import WeightUpdater

    monkeypatch.setattr(WeightUpdater, "replies_after_copies", lambda self: True)
    engine = make_engine(tiny_qwen3)
    events: list[HandEvent] = []
    engine.scheduler.copies.mark_done = lambda: events.append(HandEvent()) or events[-1]
    try:
        yield engine, events
    finally:
        engine.shutdown()


def _update(engine, version: str | None, layer: int = 0, scale: float = 1.0):
    from trainer_support import checkpoint_tensors

    named = [(n, t * scale) for n, t in checkpoint_tensors(engine.model_path).items()
             if n.endswith(f"layers.{layer}.mlp.down_proj.weight")]
    return engine.scheduler.submit(p.UpdateWeightsFromTensorRequest(named_tensors=named, weight_version=version))


def _wait_for(predicate, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_scheduler_replies_after_the_copy_and_takes_the_next_call_meanwhile(held_copies):
    engine, events = held_copies
    first = _update(engine, "v1")
    _wait_for(lambda: len(events) == 1)
    second = _update(engine, "v2")  # taken while the first call's copy "runs"
    _wait_for(lambda: len(events) == 2)
    time.sleep(0.05)
    assert not first.done() and not second.done() and engine.scheduler.sessions.weight_version == "v2"  # committed, not yet answered
    events[0].completed = True
    assert first.result(timeout=10).weight_version == "v1" and not second.done()
    events[1].completed = True
    assert second.result(timeout=10).success and not engine.scheduler.copies.pending


def test_another_control_request_waits_for_every_copy(held_copies):
    engine, events = held_copies
    update = _update(engine, "v1")
    _wait_for(lambda: len(events) == 1)
    load = engine.scheduler.submit(p.GetLoadRequest())  # routers poll it: answered beside the copy
    assert load.result(timeout=10).weight_version == "v1" and not update.done()
    check = engine.scheduler.submit(p.CheckWeightsRequest(action="checksum"))
    assert check.result(timeout=10).success and events[0].waited == 1  # it waited for the copy, whose reply went first
    assert update.done() and update.result().success


def test_a_shutdown_answers_the_held_replies(held_copies):
    engine, events = held_copies
    update = _update(engine, "v1")
    _wait_for(lambda: len(events) == 1)
    engine.shutdown()
    assert update.result(timeout=10).success and events[0].waited == 1


def test_a_device_fault_at_shutdown_tells_the_held_caller_the_outcome_is_unknown(held_copies):
    """The loop stops while a copy is held and waiting for it fails (the device faulted): the caller is answered, not
    left waiting, and told the outcome is unknown."""
    engine, events = held_copies
    update = _update(engine, "v1")
    _wait_for(lambda: len(events) == 1)

    def fault() -> None:
        raise RuntimeError("injected device fault")

    events[0].synchronize = fault
    engine.shutdown()
    out = update.result(timeout=10)
    assert not out.success and "outcome unknown" in out.message, out.message


def test_a_held_reply_counts_the_requests_paused_across_it(held_copies):
    """SGLang's num_paused_requests on a reply sent after its copy: the started request paused in place is counted,
    as on a reply sent at once."""
    import threading as th

    engine, events = held_copies
    done = []
    worker = th.Thread(target=lambda: done.append(engine.generate(input_ids=[1, 2, 3], sampling_params={
        "max_new_tokens": 400, "temperature": 0, "ignore_eos": True})))
    worker.start()
    try:
        _wait_for(lambda: engine.scheduler.batcher.num_started == 1)
        assert engine.scheduler.submit(p.PauseGenerationRequest(mode="in_place")).result(timeout=10).success
        update = _update(engine, "v1")
        _wait_for(lambda: len(events) == 1)
        events[0].completed = True
        out = update.result(timeout=10)
        assert out.success and out.num_paused_requests == 1, out
    finally:
        engine.scheduler.submit(p.ContinueGenerationRequest()).result(timeout=10)
        worker.join(60)
    assert len(done[0]["output_ids"]) == 400


def test_a_call_failing_mid_copy_answers_at_once_and_holds_nothing(held_copies, monkeypatch):
    """A fault inside the copies of a call whose reply would wait for them: it fails now, naming the fault, the weights
    as they were (checksums), no copy held; the next call replies after its copy as before."""
    from hotswap.scheduler import weight_updater

    engine, events = held_copies
    before = engine.check_weights("checksum").digest

    def fault(*args, **kwargs):
        raise RuntimeError("injected copy fault")

    real = weight_updater.apply_tensors
    monkeypatch.setattr(weight_updater, "apply_tensors", fault)
    out = _update(engine, "v1").result(timeout=10)
    assert not out.success and "injected copy fault" in out.message and "weights unchanged" in out.message
    assert events == [] and not engine.scheduler.copies.pending and engine.check_weights("checksum").digest == before
    monkeypatch.setattr(weight_updater, "apply_tensors", real)
    update = _update(engine, "v2")
    _wait_for(lambda: len(events) == 1)
    events[0].completed = True
    assert update.result(timeout=10).success


def test_a_refusal_behind_held_replies_comes_after_them(held_copies):
    """SGLang's mode (no session): a bucket naming no weight, sent while two earlier buckets' replies wait for their
    copies, is refused behind them, so a trainer reading its replies in order hears of the refusal last."""
    import torch

    engine, events = held_copies
    first, second = _update(engine, "v1"), _update(engine, "v2", layer=1)
    _wait_for(lambda: len(events) == 2)
    bad = engine.scheduler.submit(p.UpdateWeightsFromTensorRequest(named_tensors=[("model.no_such.weight", torch.zeros(2))]))
    _wait_for(lambda: len(events) == 3)
    time.sleep(0.05)
    assert not bad.done()
    for event in events:
        event.completed = True
    assert first.result(timeout=10).success and second.result(timeout=10).success
    out = bad.result(timeout=10)
    assert not out.success and "no_such" in out.message and out.elapsed_s in (None, 0, 0.0), out
    assert engine.weight_version == "v2" and not engine.scheduler.copies.pending


def test_a_session_begun_behind_a_held_copy_starts_after_it(held_copies):
    """begin_weight_update waits for the copies held before it; the calls inside the session reply after their copies
    too, and ending the session waits for them first."""
    engine, events = held_copies
    update = _update(engine, "v1")
    _wait_for(lambda: len(events) == 1)
    begun = engine.scheduler.submit(p.BeginWeightUpdateRequest())
    assert begun.result(timeout=10).success and events[0].waited == 1 and update.result(timeout=10).success
    before = engine.check_weights("checksum").digest  # a control request: answered with nothing held
    inside = _update(engine, None, scale=2.0)
    _wait_for(lambda: len(events) == 2)
    time.sleep(0.05)
    assert not inside.done()
    ended = engine.scheduler.submit(p.EndWeightUpdateRequest(abort=True))
    assert ended.result(timeout=10).success and events[1].waited == 1
    assert inside.result(timeout=10).success and not engine.scheduler.copies.pending
    assert engine.check_weights("checksum").digest == before


def test_a_session_call_failing_behind_held_copies_rolls_back_every_call(held_copies):
    """Inside a session, calls 1 and 2 hold their replies while their copies "run"; call 3 fails (a bad shape): it
    answers the failure once the earlier replies went out, each a success, in order, and the session is marked failed.
    Ending it refuses the commit and restores the weights of before the session, bit for bit."""
    import torch

    engine, events = held_copies
    begin = engine.scheduler.submit(p.BeginWeightUpdateRequest()).result(timeout=10)
    assert begin.success
    before = engine.check_weights("checksum").digest
    first, second = _update(engine, None, layer=0, scale=2.0), _update(engine, None, layer=1, scale=3.0)
    _wait_for(lambda: len(events) == 2)
    bad = engine.scheduler.submit(p.UpdateWeightsFromTensorRequest(
        named_tensors=[("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3))]))
    _wait_for(lambda: len(events) == 3)  # the refusal is held behind the two replies, in order
    time.sleep(0.05)
    assert not first.done() and not second.done() and not bad.done()
    events[0].completed = True
    assert first.result(timeout=10).success and not second.done() and not bad.done()
    events[1].completed = events[2].completed = True
    assert second.result(timeout=10).success
    out = bad.result(timeout=10)
    assert not out.success and "shape" in out.message, out.message
    commit = engine.scheduler.submit(p.EndWeightUpdateRequest()).result(timeout=10)  # a failed session ends rolled back
    assert not commit.success and commit.rolled_back, commit.message
    assert engine.check_weights("checksum").digest == before and not engine.scheduler.copies.pending


@pytest.mark.gpu
def test_gpu_tensor_updates_sent_back_to_back_land_in_order(tiny_qwen3):
    """Calls queued together: the scheduler takes each while the last one's copy runs; every reply comes after its
    copy, in order, the last call's bytes and version stay, and a generate sent among them finishes."""
    import torch

    from hotswap import Engine

    with Engine(str(tiny_qwen3), device="cuda", dtype="bfloat16") as engine:
        name = "model.layers.0.mlp.down_proj.weight"
        shape = engine.model_runner.weight_map.slots[name].hf_shape
        sources = [torch.full(shape, float(k + 1), dtype=torch.bfloat16, device="cuda") for k in range(6)]
        generated = []
        futures = []
        for k, src in enumerate(sources):
            futures.append(engine.scheduler.submit(p.UpdateWeightsFromTensorRequest(named_tensors=[(name, src)], weight_version=f"b{k}")))
            if k == 2:
                worker = threading.Thread(target=lambda: generated.append(engine.generate(input_ids=[1, 2, 3], sampling_params={
                    "max_new_tokens": 4, "temperature": 0, "ignore_eos": True})))
                worker.start()
        outs = [f.result(timeout=60) for f in futures]
        worker.join(timeout=60)
        assert all(o.success for o in outs), [o.message for o in outs]
        assert [o.weight_version for o in outs] == [f"b{k}" for k in range(6)] and all(o.elapsed_s > 0 for o in outs)
        assert engine.weight_version == "b5" and not engine.scheduler.copies.pending
        assert len(generated) == 1 and len(generated[0]["output_ids"]) == 4
        got = torch.tensor(engine.get_weights_by_name(name), dtype=torch.float32)
        assert torch.equal(got, sources[-1][: len(got)].float().cpu())


@pytest.mark.gpu
def test_gpu_session_calls_back_to_back_commit_or_roll_back_bit_exact(tiny_qwen3):
    """Inside a session, calls queued together reply after their copies (and saves), in order; a session whose third
    call is refused ends rolled back to the checksum it began from, a second one commits the last call's bytes."""
    import torch

    from hotswap import Engine

    with Engine(str(tiny_qwen3), device="cuda", dtype="bfloat16") as engine:
        name = "model.layers.0.mlp.down_proj.weight"
        shape = engine.model_runner.weight_map.slots[name].hf_shape
        sources = [torch.full(shape, float(k + 1), dtype=torch.bfloat16, device="cuda") for k in range(5)]
        submit = engine.scheduler.submit
        before = engine.check_weights("checksum").digest
        assert submit(p.BeginWeightUpdateRequest()).result(timeout=60).success
        calls = [submit(p.UpdateWeightsFromTensorRequest(named_tensors=[(name, src if k != 2 else src[:1])]))
                 for k, src in enumerate(sources)]
        outs = [f.result(timeout=60) for f in calls]
        assert [o.success for o in outs] == [True, True, False, False, False], [o.message for o in outs]
        assert not submit(p.EndWeightUpdateRequest()).result(timeout=60).success  # failed: rolled back
        assert engine.check_weights("checksum").digest == before and not engine.scheduler.copies.pending
        assert submit(p.BeginWeightUpdateRequest()).result(timeout=60).success
        calls = [submit(p.UpdateWeightsFromTensorRequest(named_tensors=[(name, src)])) for src in sources]
        assert all(f.result(timeout=60).success for f in calls)
        assert submit(p.EndWeightUpdateRequest(weight_version="s2")).result(timeout=60).success
        got = torch.tensor(engine.get_weights_by_name(name), dtype=torch.float32)
        assert engine.weight_version == "s2" and torch.equal(got, sources[-1][: len(got)].float().cpu())
