"""The scheduler's watchdog (SGLang's `watchdog_timeout`): a forward step that hangs fails the engine, so `hotswap
serve` (which polls `Engine.failure()`) exits instead of serving nothing for ever."""

from __future__ import annotations

import threading
import time

from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import prompt_ids

from hotswap import Engine
from hotswap import protocol as p


def _hang_first_step(eng: Engine, release: threading.Event) -> threading.Event:
    """The engine's next launch blocks until `release` (a hung kernel, as the scheduler thread sees it)."""
    entered, run = threading.Event(), eng.scheduler.model_runner.run

    def hung(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return run(*args, **kwargs)

    eng.scheduler.model_runner.run = hung
    return entered


def _failure_within(eng: Engine, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while (why := eng.failure()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return why


def test_a_hung_step_fails_the_engine_naming_the_bound(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, watchdog_timeout=0.5) as eng:
        assert eng.config.step_timeout_s == 0.5 and eng.failure() is None
        release = threading.Event()
        entered = _hang_first_step(eng, release)
        outs: list = []
        caller = threading.Thread(target=lambda: outs.append(eng.generate(input_ids=prompt_ids(1, 5), sampling_params=GREEDY)))
        caller.start()
        try:
            assert entered.wait(10)
            why = _failure_within(eng, 10)
        finally:
            release.set()
            caller.join(30)
        assert why is not None and "launching a forward step has run for more than 0.5 s" in why
        assert "step_timeout_s, SGLang's watchdog_timeout" in why
        assert eng.failure() == why  # it stays failed: the server exits on it
        assert len(outs[0]["output_ids"]) == GREEDY["max_new_tokens"]  # the step that came back still answered its caller


def test_an_idle_engine_and_a_control_request_are_not_watched(tiny_qwen3):
    """Only steps are watched: a weight update (bounded by its own timeouts) running past the bound fails nothing."""
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, watchdog_timeout=0.2) as eng:
        load, entered, release = eng.scheduler.handlers, threading.Event(), threading.Event()
        update = load[p.UpdateWeightsFromDiskRequest]

        def slow_update(*args, **kwargs):
            entered.set()
            release.wait(30)
            return update(*args, **kwargs)

        load[p.UpdateWeightsFromDiskRequest] = slow_update
        done = threading.Thread(target=lambda: eng.update_weights_from_disk(str(tiny_qwen3)))
        done.start()
        try:
            assert entered.wait(10)
            assert _failure_within(eng, 1.0) is None
        finally:
            release.set()
            done.join(30)
        assert eng.failure() is None
