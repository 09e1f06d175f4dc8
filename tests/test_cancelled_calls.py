"""A caller that gives up on a generate call (its asyncio task cancelled or timed out, Ctrl-C in a blocking call, its
HTTP connection closed before the reply) frees what the call started: the scheduler aborts its requests and their KV
pages go back, within a step, rather than generating to max_new_tokens for nobody. SGLang aborts a request whose HTTP
client went away (tokenizer_manager.py `_wait_one_response`, polling `request.is_disconnected()`); hotswap aborts on
the cancellation itself, offline calls included."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import socket
import threading
from urllib.parse import urlsplit

import pytest
from engine_support import wait_idle, wait_running

LONG = {"max_new_tokens": 500, "temperature": 0.0, "ignore_eos": True}


def pause_when_running(engine, running: int) -> None:
    """Once `running` requests run, freeze them in place (generation paused): from then on only an abort ends them."""
    wait_running(engine, running)
    assert engine.pause_generation(mode="in_place").success


@contextlib.contextmanager
def all_freed_by_abort(engine):
    """On leaving, every request is gone and its pages are back, while generation stays paused (no request could
    finish on its own); then generation continues."""
    try:
        yield
        wait_idle(engine)
    finally:
        assert engine.continue_generation().success
    check = engine.check_invariants()
    assert check.success, check.message


async def consume(engine, **kwargs) -> None:
    stream = await engine.async_generate(stream=True, **kwargs)
    async for _ in stream:
        pass


@pytest.mark.parametrize(("kwargs", "running"), [
    ({"prompt": "Alice likes", "sampling_params": LONG}, 1),
    ({"prompt": ["Alice likes", "Bob"], "sampling_params": LONG}, 2),
    ({"prompt": "Alice likes", "sampling_params": {**LONG, "n": 3, "temperature": 1.0}}, 3),
    ({"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": LONG, "stream": True}, 2),
], ids=["one", "batch", "n3", "stream"])
def test_a_timed_out_async_generate_aborts_its_requests(engine, kwargs, running):
    """verl / SkyRL / AReaL put a per-request timeout on `await engine.async_generate(...)` (asyncio.wait_for)."""

    async def main() -> None:
        call = consume(engine, **{k: v for k, v in kwargs.items() if k != "stream"}) if kwargs.get("stream") else engine.async_generate(**kwargs)
        task = asyncio.ensure_future(call)
        await asyncio.to_thread(pause_when_running, engine, running)
        with all_freed_by_abort(engine):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(task, 0.01)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_loop_closed_right_after_a_cut_stream_is_not_kept(engine):
    """A framework that runs each batch on a fresh event loop (`run_until_complete`, then `close`; `asyncio.run` when the
    timing falls so) and cuts a stream: the abort's last output wakes a loop that never runs again. That loop, its
    mailbox and the outputs in it were kept for good, one per such batch; a later loop's first call now drops them."""

    async def cut_stream() -> None:
        stream = await engine.async_generate(input_ids=[5, 6, 7, 8], sampling_params=LONG, stream=True)
        async for _ in stream:
            break
        await stream.aclose()

    gc.collect()
    before = len(engine._mailboxes._boxes)
    for _ in range(10):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(cut_stream())
        # two steps of another request: the step that took the abort has handed the cut stream's last output to this
        # loop's mailbox and scheduled its wake-up, which never runs
        engine.generate(input_ids=[9, 10, 11], sampling_params={"max_new_tokens": 2, "ignore_eos": True})
        loop.close()
    out = asyncio.run(engine.async_generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 1}))
    assert out["meta_info"]["completion_tokens"] == 1
    gc.collect()
    assert len(engine._mailboxes._boxes) <= before


@contextlib.contextmanager
def ctrl_c_reaches_the_main_thread():
    """Python's own SIGINT handling in the main thread for the block (a test run earlier in this worker process may have
    left another handler, or SIGINT blocked), restored after."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
def test_ctrl_c_in_a_blocking_generate_aborts_its_request(engine, stream):
    raised = threading.Event()

    def interrupt() -> None:
        pause_when_running(engine, 1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not raised.wait(20):  # no KeyboardInterrupt came: end the call, so the test fails instead of waiting for good
            engine.abort_request(abort_all=True)

    helper = threading.Thread(target=interrupt)
    with ctrl_c_reaches_the_main_thread(), all_freed_by_abort(engine):
        helper.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                out = engine.generate("Alice likes", LONG, stream=stream)
                for _ in out if stream else ():
                    pass
        finally:
            raised.set()
            helper.join(30)


@pytest.mark.parametrize(("path", "body", "running"), [
    ("/generate", {"text": "Alice likes", "sampling_params": LONG}, 1),
    ("/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {**LONG, "n": 2, "temperature": 1.0}}, 4),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                              "ignore_eos": True}, 1),
], ids=["generate", "generate-batch-n2", "chat"])
def test_a_client_gone_before_a_non_streamed_reply_aborts_its_requests(server, engine, path, body, running):
    """httpx / aiohttp timeouts close the connection while the request runs; the reply has nobody to go to."""
    url = urlsplit(server.url)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode() + data)
        pause_when_running(engine, running)
        with all_freed_by_abort(engine):
            sock.close()
