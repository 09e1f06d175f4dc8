"""`serve(args)` in its own process — progress bar on load, SIGTERM drains then aborts cleanly."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_support import free_port, serve_env, wait_healthy

from hotswap.server.launch import add_serve_arguments, engine_kwargs_from_args


def test_serve_arguments():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m", "--page-size", "4", "--num-pages", "64", "--max-running-requests", "8"])
    assert (args.host, args.port, args.dtype, args.device, args.api_key, args.served_model_name) == ("127.0.0.1", 30000, "auto", "auto", None, None)
    assert engine_kwargs_from_args(args) == {"page_size": 4, "num_pages": 64, "max_running_requests": 8}
    assert args.frontend_process is True  # the HTTP front end runs in its own process unless --no-frontend-process


@pytest.mark.parametrize("frontend_process", [False, True], ids=["in-process", "frontend-process"])
def test_serve_sigterm_drains_then_aborts(tiny_qwen3, frontend_process):
    """Served in one process, or with the HTTP front end in its own (the signal reaches the engine's process,
    which forwards it): SIGTERM drains, then aborts what is left, and the server exits 0."""
    port = free_port()
    code = (
        "import argparse, sys\n"
        "from hotswap.server.launch import add_serve_arguments, serve\n"
        "p = argparse.ArgumentParser(); add_serve_arguments(p)\n"
        "serve(p.parse_args(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--model-path", str(tiny_qwen3), "--port", str(port), "--device", "cpu", "--page-size", "4",
         "--num-pages", "256", "--drain-timeout", "1", "--api-key", "k", "--log-level", "info"]
        + ([] if frontend_process else ["--no-frontend-process"]),
        env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer k"}
    try:
        wait_healthy(proc, url, timeout=60)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            assert c.get("/get_server_info").json()["num_pages"] == 256
            # hold generation so the stream cannot finish by itself: the drain must end it
            assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
            with c.stream("POST", "/generate", json={"text": "Alice likes", "stream": True,
                                                     "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}}) as r:
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                lines = [x for x in r.iter_lines() if x]
                waited = time.monotonic() - t0
        assert lines[-1] == "data: [DONE]"
        final = json.loads(lines[-2][len("data: "):])
        assert final["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0.5 < waited < 15  # drained for --drain-timeout, then aborted
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "hotswap: 4/4" in err  # the load progress bar reached its end
    assert "draining" in err


def test_a_scheduler_stopped_on_an_error_stops_the_server(tiny_qwen3, monkeypatch):
    """The other half of `Engine.failure()`: a scheduler loop that died on an error (every request fails with its
    reason from then on) is named there, and the server's watch asks uvicorn to drain and exit, as for a dead
    tensor-parallel worker."""
    from hotswap import Engine
    from hotswap.server.launch import _stop_on_failure

    class Uvicorn:
        should_exit = False

        def handle_exit(self, sig, frame):
            self.should_exit, self.signal = True, sig

    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        assert eng.failure() is None

        def broken():
            raise RuntimeError("injected scheduling fault")

        monkeypatch.setattr(eng.scheduler, "schedule", broken)
        out = eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
        assert out["meta_info"]["finish_reason"]["type"] == "abort" and "injected scheduling fault" in str(out["meta_info"]["finish_reason"])
        assert "injected scheduling fault" in eng.failure()
        server = Uvicorn()
        _stop_on_failure(server, eng.failure)
        assert server.should_exit and server.signal == signal.SIGTERM
