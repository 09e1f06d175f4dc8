"""Engine.shutdown() while other threads wait on generate: each call ends (finish_reason abort), none hangs."""

import asyncio
import threading
import time

from hotswap import Engine

LONG = {"max_new_tokens": 100_000, "temperature": 1.0, "ignore_eos": True}


def test_shutdown_ends_generate_calls_other_threads_wait_on(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")  # a context far past the model's
    engine = Engine(str(tiny_qwen3), device="cpu", page_size=4, max_context_len=200_000)
    got: dict[str, object] = {}

    def blocking():
        got["blocking"] = engine.generate(input_ids=[1, 2, 3], sampling_params=LONG)["meta_info"]["finish_reason"]["type"]

    def streaming():
        chunks = list(engine.generate(input_ids=[1, 2, 3], sampling_params=LONG, stream=True))
        got["streaming"] = chunks[-1]["meta_info"]["finish_reason"]["type"]

    def in_asyncio():
        got["async"] = asyncio.run(engine.async_generate(input_ids=[1, 2, 3], sampling_params=LONG))["meta_info"]["finish_reason"]["type"]

    threads = [threading.Thread(target=f, daemon=True) for f in (blocking, streaming, in_asyncio)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine.get_load().num_running < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.shutdown()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), f"generate calls still waiting after shutdown: {got}"
    assert got == {"blocking": "abort", "streaming": "abort", "async": "abort"}
