"""The update-session state machine on its own: fake apply callables write into plain CPU tensors."""

from __future__ import annotations

import time

import torch

from hotswap.errors import HotswapError
from hotswap.models.parallel import ShardSpec
from hotswap.weights.mapping import WeightSlot
from hotswap.weights.ranks import LocalRanks
from hotswap.weights.session import Sessions


def slot(name: str, values: list[float]) -> WeightSlot:
    t = torch.tensor(values)
    spec = ShardSpec(dest_dim=0, dest_start=0, dest_len=len(values), src_dim=0, src_start=0, src_len=len(values), hf_shape=(len(values),))
    return WeightSlot(name, spec, t)


def machine(timeout_s: float = 600.0) -> tuple[Sessions, list[str]]:
    flushes: list[str] = []
    sessions = Sessions(ranks=LocalRanks(), device_budget_bytes=0, timeout_s=timeout_s,
                        invalidate_cache=lambda: flushes.append("flush"))
    return sessions, flushes


def writer(target: WeightSlot, value: float, sessions: Sessions, fail: bool = False):
    """An apply callable: saves the original when the session asks, writes `value`, may fail afterwards."""
    def apply(session):
        guard = sessions.guard(session, source_can_fail=fail)
        if guard is not None:
            guard.protect_many([target])
        target.dest.fill_(value)
        if fail:
            raise HotswapError("the source broke after copying")
        return 1, target.dest.numel() * 4

    return apply


def test_single_call_commits_and_keeps_version_unless_given():
    sessions, flushes = machine()
    a = slot("a", [0.0, 0.0])
    out = sessions.run("update", None, writer(a, 1.0, sessions))
    assert out.success and out.weight_version == "default" and a.dest.tolist() == [1.0, 1.0]
    assert sessions.session is None and flushes == ["flush"]
    out = sessions.run("update", "v1", writer(a, 2.0, sessions))
    assert out.success and sessions.weight_version == "v1"


def test_call_that_changes_nothing_commits_nothing():
    sessions, flushes = machine()
    out = sessions.run("update", None, lambda s: (0, 0))
    assert out.success and "nothing to commit" in out.message and flushes == [] and sessions.weight_version == "default"


def test_failing_call_rolls_back_its_own_copies():
    sessions, _ = machine()
    a = slot("a", [3.0])
    out = sessions.run("update", "v9", writer(a, 7.0, sessions, fail=True))
    assert not out.success and out.rolled_back and "source broke" in out.message
    assert a.dest.tolist() == [3.0] and sessions.weight_version == "default" and sessions.session is None


def test_session_rolls_back_every_bucket_after_a_failing_one():
    sessions, flushes = machine()
    a, b = slot("a", [1.0]), slot("b", [2.0])
    assert sessions.begin().success and sessions.open
    assert sessions.run("bucket", "v2", writer(a, 10.0, sessions)).success
    assert sessions.weight_version == "v2"  # readable at once
    out = sessions.run("bucket", None, writer(b, 20.0, sessions, fail=True))
    assert not out.success and "marked failed" in out.message
    assert a.dest.tolist() == [1.0] and b.dest.tolist() == [2.0] and sessions.weight_version == "default"
    refused = sessions.run("bucket", None, writer(a, 5.0, sessions))
    assert not refused.success and "already failed" in refused.message and a.dest.tolist() == [1.0]
    end = sessions.end(None, abort=False)
    assert not end.success and end.rolled_back and sessions.session is None and flushes == []


def test_rollback_of_overlapping_slots_restores_the_originals():
    """One expert's slice of a stacked tensor, then the whole stack, in one session: the whole stack's saved
    copy already holds the expert's new values, so a rollback must restore the earliest save last."""
    stack = slot("experts.gate_up_proj", [1.0, 2.0, 3.0, 4.0])
    spec = ShardSpec(dest_dim=0, dest_start=1, dest_len=2, src_dim=0, src_start=0, src_len=2, hf_shape=(2,))
    expert = WeightSlot("experts.1.gate_proj", spec, stack.dest[1:3])
    sessions, _ = machine()
    assert sessions.begin().success
    assert sessions.run("bucket", None, writer(expert, 9.0, sessions)).success
    assert sessions.run("bucket", None, writer(stack, 7.0, sessions)).success
    assert not sessions.run("bucket", None, writer(slot("other", [0.0]), 1.0, sessions, fail=True)).success
    assert stack.dest.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_session_commits_once_with_its_version():
    sessions, flushes = machine()
    a, b = slot("a", [1.0]), slot("b", [2.0])
    assert sessions.begin().success
    assert sessions.run("bucket", None, writer(a, 10.0, sessions)).success
    assert sessions.run("bucket", None, writer(b, 20.0, sessions)).success
    assert flushes == []  # nothing committed yet
    end = sessions.end("step-3", abort=False)
    assert end.success and end.num_tensors == 2 and end.weight_version == "step-3"
    assert flushes == ["flush"] and sessions.session is None and (a.dest.item(), b.dest.item()) == (10.0, 20.0)
    assert not sessions.end(None, abort=False).success  # no session any more


def test_begun_session_inside_a_pause_is_not_closed_by_continue():
    sessions, _ = machine()
    a = slot("a", [1.0])
    sessions.open_pause()
    assert sessions.close_pause() == "nothing to commit; weight version default"
    sessions.open_pause()
    assert sessions.begin().success
    assert sessions.run("bucket", None, writer(a, 4.0, sessions)).success
    assert sessions.close_pause() is None and sessions.begun  # refused: the half-pushed session stays open
    assert sessions.end("v5", abort=False).success
    assert sessions.session is not None and not sessions.begun  # back to the pause's own session
    assert sessions.close_pause().startswith("nothing to commit") and sessions.session is None


def test_silent_session_expires_and_rolls_back():
    sessions, _ = machine(timeout_s=0.05)
    a = slot("a", [1.0])
    assert sessions.begin().success
    assert sessions.run("bucket", "v7", writer(a, 9.0, sessions)).success
    assert not sessions.expire()  # not silent yet
    time.sleep(0.1)
    assert sessions.expire()
    assert a.dest.tolist() == [1.0] and sessions.weight_version == "default" and sessions.session is None
    out = sessions.run("update", None, writer(a, 2.0, sessions))
    assert not out.success and "expired" in out.message  # the trainer hears about it once
    assert sessions.run("update", None, writer(a, 2.0, sessions)).success


def test_a_pause_never_expires_with_or_without_updates():
    sessions, _ = machine(timeout_s=0.0)
    sessions.open_pause()
    assert not sessions.expire() and sessions.open
    a = slot("a", [1.0])
    assert sessions.run("update", "v2", writer(a, 2.0, sessions)).success
    time.sleep(0.01)
    assert not sessions.expire() and sessions.open and a.dest.tolist() == [2.0] and sessions.weight_version == "v2"


def test_mark_makes_content_changes_visible_once():
    sessions, _ = machine()
    sessions.set_version("v3")
    sessions.mark("reset")
    sessions.mark("reset")
    assert sessions.weight_version == "v3+reset"


# ---- session ids: a call of a session that is not open changes nothing, the open session included ----------


def test_a_bucket_of_an_aborted_session_is_refused_and_changes_nothing():
    sessions, flushes = machine()
    a = slot("a", [1.0])
    begun = sessions.begin()
    ok, _ = begun  # still SGLang's (success, message)
    sid = begun.session_id
    assert ok and sid and begun["session_id"] == sid
    assert sessions.run("bucket", "v2", writer(a, 5.0, sessions), session_id=sid).success
    assert sessions.end(None, abort=True, session_id=sid).success
    late = sessions.run("bucket", "v2", writer(a, 9.0, sessions), session_id=sid)
    assert not late.success and f"session '{sid}' is not open: it was aborted; weights unchanged" in late.message
    assert late.extra.session == "aborted" and not late.rolled_back
    assert a.dest.tolist() == [1.0] and sessions.weight_version == "default" and sessions.session is None and flushes == []
    refused = sessions.refuse_update("bucket refused: bad shape", sid)  # a validation refusal of that late call
    assert not refused.success and "is not open" in refused.message and sessions.session is None
    assert sessions.run("update", None, writer(a, 3.0, sessions)).success  # a call without an id: as before ids
    assert a.dest.tolist() == [3.0]


def test_a_late_bucket_of_an_old_session_leaves_the_new_session_alone():
    """Session 1 is aborted (its trainer gave up), a retry opens session 2; session 1's late bucket (a valid one,
    or one validation refuses) is refused and session 2 commits exactly its own buckets."""
    sessions, _ = machine()
    a, b = slot("a", [1.0]), slot("b", [2.0])
    s1 = sessions.begin().session_id
    assert sessions.end(None, abort=True, session_id=s1).success
    s2 = sessions.begin().session_id
    assert s2 != s1
    assert sessions.run("bucket", None, writer(b, 20.0, sessions), session_id=s2).success
    late = sessions.run("bucket", None, writer(a, 10.0, sessions), session_id=s1)
    assert not late.success and "it was aborted" in late.message and "the open session is untouched" in late.message
    late = sessions.refuse_update("bucket refused: shape mismatch; weights unchanged", s1)
    assert not late.success and "shape mismatch" in late.message and "is not open" in late.message and not late.rolled_back
    assert sessions.session.failure is None and b.dest.tolist() == [20.0]  # session 2 neither failed nor rolled back
    end = sessions.end("v2", abort=False, session_id=s2)
    assert end.success and end.num_tensors == 1 and sessions.weight_version == "v2"
    assert (a.dest.item(), b.dest.item()) == (1.0, 20.0)


def test_stale_end_and_abort_leave_the_open_session_alone():
    """An abort ends its own session and never another: of a session that ended without a commit it is a
    no-op that answers success; of a committed or unknown one it is refused. A stale commit is refused."""
    sessions, flushes = machine()
    a = slot("a", [1.0])
    committed = sessions.begin().session_id
    assert sessions.end("v1", abort=False, session_id=committed).success
    aborted = sessions.begin().session_id
    assert sessions.end(None, abort=True, session_id=aborted).success
    open_id = sessions.begin().session_id
    assert sessions.run("bucket", None, writer(a, 7.0, sessions), session_id=open_id).success
    out = sessions.end(None, abort=True, session_id=aborted)
    assert out.success and not out.rolled_back and "nothing to abort" in out.message and out.extra.session == "aborted"
    out = sessions.end(None, abort=True, session_id=committed)
    assert not out.success and "it was committed" in out.message and out.extra.session == "committed"
    out = sessions.end(None, abort=True, session_id="never-opened")
    assert not out.success and "nothing aborted" in out.message and out.extra.session == "unknown"
    out = sessions.end("v9", abort=False, session_id=aborted)
    assert not out.success and "nothing committed" in out.message
    assert sessions.session.id == open_id and sessions.session.failure is None and a.dest.tolist() == [7.0]
    assert sessions.weight_version == "v1" and flushes == []  # nothing was committed since the first (empty) session
    assert sessions.end("v3", abort=False, session_id=open_id).success and a.dest.tolist() == [7.0] and sessions.weight_version == "v3"


def test_a_late_call_of_an_expired_session_hears_of_the_expiry():
    sessions, _ = machine(timeout_s=0.05)
    a = slot("a", [1.0])
    sid = sessions.begin().session_id
    assert sessions.run("bucket", None, writer(a, 9.0, sessions), session_id=sid).success
    time.sleep(0.1)
    assert sessions.expire() and a.dest.tolist() == [1.0]
    late = sessions.run("bucket", None, writer(a, 9.0, sessions), session_id=sid)
    assert not late.success and "it expired" in late.message and "expired after" in late.message and a.dest.tolist() == [1.0]
    out = sessions.end(None, abort=True, session_id=sid)  # the trainer's abort: its session's updates are gone, as it wants
    assert out.success and out.extra.session == "expired"
    assert sessions.run("update", None, writer(a, 2.0, sessions)).success  # the expiry was told once, to its trainer
