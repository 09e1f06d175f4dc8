"""The command line as a new user meets it: --version, make-tiny-model, the SGLang flags serve accepts,
and one clear line (no traceback) when the port is taken; --port 0 reports the port it got."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import hotswap
from hotswap import Engine
from hotswap.cli import build_parser, main
from hotswap.server.launch import add_serve_arguments, engine_kwargs_from_args, sglang_flags

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"hotswap {hotswap.__version__}"


def test_make_tiny_model_writes_a_servable_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-tiny-model", str(out)]) == 0
    assert "hotswap serve --model-path" in capsys.readouterr().out
    with Engine(str(out), device="cpu", page_size=4, num_pages=16) as eng:
        assert eng.generate("hello", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] == 2
    assert main(["make-tiny-model", str(out)]) == 2  # never writes into a folder that holds files


def test_sglang_flags_reach_the_engine(tiny_qwen3, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m", "--mem-fraction-static", "0.5", "--context-length", "128",
                              "--tokenizer-path", str(tiny_qwen3), "--chat-template", str(template), "--trust-remote-code",
                              "--weight-update-bucket-bytes", "4096", "--weight-update-session-timeout", "5",
                              "--cuda-ipc-cache-bytes", str(3 << 30)])
    kw = engine_kwargs_from_args(args)
    assert kw == {"mem_fraction_static": 0.5, "max_context_len": 128, "tokenizer_path": str(tiny_qwen3),
                  "chat_template": str(template), "weight_update_bucket_bytes": 4096, "weight_session_timeout_s": 5.0,
                  "cuda_ipc_cache_bytes": 3 << 30}
    assert args.trust_remote_code and args.host == "127.0.0.1"  # loopback unless told otherwise
    del kw["mem_fraction_static"]  # a GPU sizing knob
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, num_pages=64, **kw) as eng:
        assert eng.max_context_len == 128 and eng.config.weight_session_timeout_s == 5.0
        assert eng.scheduler.weight_updater.ipc_mappings.max_bytes == 3 << 30
        assert eng.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"


def _serve(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hotswap.cli", "serve", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_port_in_use_is_one_clear_line(tiny_qwen3):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve("--model-path", str(tiny_qwen3), "--device", "cpu", "--port", str(taken.getsockname()[1]), "--log-level", "error")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in err and re.search(r"hotswap: error: cannot listen on 127\.0\.0\.1:\d+: Address already in use", err), err


def test_port_zero_reports_the_bound_port(tiny_qwen3):
    proc = _serve("--model-path", str(tiny_qwen3), "--device", "cpu", "--port", "0", "--page-size", "4", "--num-pages", "64",
                  "--no-warmup", "--log-level", "info")
    try:
        port = None
        deadline = time.monotonic() + 120
        lines = []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port and port != 0, "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_readme_links_resolve():
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in link]
    assert links
    missing = [link for link in links if not (root / link).exists()]
    assert not missing, missing


def test_sglang_launch_flags_reach_the_engine_or_are_refused_by_name(tiny_qwen3, capsys):
    """A framework's `python -m sglang.launch_server ...` command line runs as `hotswap serve ...` unchanged: flags hotswap
    has no option for are typed as SGLang's defaults and taken or refused by the Engine, by name."""
    parser = build_parser()
    argv = ["serve", "--model-path", str(tiny_qwen3), "--tp", "1", "--disable-radix-cache", "--chunked-prefill-size", "-1",
            "--cuda-graph-bs", "1", "2", "4", "--skip-server-warmup", "--max-prefill-tokens=4096",
            "--log-requests", "--watchdog-timeout", "600", "--page-size", "4", "--dp", "1", "--schedule-pol", "fcfs"]
    args, extra = parser.parse_known_args(argv)
    flags = sglang_flags(extra)
    assert flags == {"disable_radix_cache": True, "chunked_prefill_size": -1, "cuda_graph_bs": [1, 2, 4],
                     "max_prefill_tokens": 4096, "log_requests": True, "watchdog_timeout": 600, "dp_size": 1,
                     "schedule_policy": "fcfs"}  # --dp: SGLang's alias; --schedule-pol: a unique prefix, as its argparse takes it
    assert args.no_warmup and args.tensor_parallel_size == 1
    # an inline boolean, a float default, a string where SGLang's default is None
    assert sglang_flags(["--enable-metrics=false", "--schedule-conservativeness", "0.5", "--tool-call-parser", "qwen25"]) == \
        {"enable_metrics": False, "schedule_conservativeness": 0.5, "tool_call_parser": "qwen25"}
    # SGLang's watchdog_timeout is a float (default written 300): a fraction of a second is taken, as its argparse does
    assert sglang_flags(["--watchdog-timeout", "2.5"]) == {"watchdog_timeout": 2.5}
    args.sglang_args = flags
    with Engine(args.model_path, device="cpu", **engine_kwargs_from_args(args)) as eng:
        assert (eng.config.enable_prefix_cache, eng.config.max_num_batched_tokens) == (False, 4096)
        assert eng.scheduler.batcher.chunked_prefill_size == 4096
    for bad, needle in ((["--enable-deterministic-inference"], "enable_deterministic_inference=True: SGLang's setting is not supported"),
                        (["--no-such-flag"], "unrecognized argument '--no-such-flag'"),
                        (["--cuda-graph-max", "8"], "ambiguous argument '--cuda-graph-max': it could be --cuda-graph-max-bs, "),
                        (["--dp", "2"], "dp_size=2: dp_size must be 1"),
                        (["--watchdog-timeout", "soon"], "--watchdog-timeout takes a number, got 'soon'"),
                        (["--max-total-tokens"], "--max-total-tokens needs a value")):
        assert main(["serve", "--model-path", str(tiny_qwen3), "--device", "cpu", "--port", "0", "--log-level", "error", *bad]) == 2
        assert needle in capsys.readouterr().err


def test_areals_default_sglang_launch_line_runs(tiny_qwen3, capsys):
    """AReaL (cli_args.py::SGLangConfig.build_args through get_py_cmd, its defaults: None, False and "" dropped) launches
    `... --max-loaded-loras 8 --lora-backend triton` without LoRA; SGLang reads LoRA's tuning only when LoRA is enabled
    (server_args.py::check_lora_server_args), so the line runs as `hotswap serve`. LoRA itself stays refused by name."""
    m = str(tiny_qwen3)
    argv = ["serve", "--tokenizer-path", m, "--tokenizer-mode", "auto", "--load-format", "auto", "--trust-remote-code", "--tp-size", "1",
            "--base-gpu-id", "0", "--nnodes", "1", "--node-rank", "0", "--model-path", m, "--random-seed", "1", "--disable-radix-cache",
            "--torch-compile-max-bs", "32", "--triton-attention-num-kv-splits", "8", "--num-continuous-decode-steps", "1",
            "--attention-backend", "fa3", "--context-length", "512", "--mem-fraction-static", "0.9", "--chunked-prefill-size", "-1",
            "--max-prefill-tokens", "32768", "--schedule-policy", "lpm", "--schedule-conservativeness", "1.0", "--cpu-offload-gb", "0",
            "--dtype", "bfloat16", "--kv-cache-dtype", "auto", "--dp-size", "1", "--ep-size", "1", "--max-loaded-loras", "8",
            "--lora-backend", "triton", "--log-level", "warning", "--log-level-http", "warning", "--log-requests-level", "0",
            "--enable-metrics", "--decode-log-interval", "1", "--host", "127.0.0.1", "--port", "0"]
    args, extra = build_parser().parse_known_args(argv)
    args.sglang_args = sglang_flags(extra)
    with Engine(args.model_path, dtype=args.dtype, device="cpu", page_size=4, num_pages=64, **engine_kwargs_from_args(args)) as eng:
        assert (eng.config.enable_prefix_cache, eng.config.attention_backend, eng.max_context_len) == (False, "auto", 512)
        assert eng.get_server_info()["max_loaded_loras"] == 8
        assert len(eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2, "ignore_eos": True})["output_ids"]) == 2
    for bad, needle in ((["--enable-lora"], "enable_lora=True: enable_lora is not supported"),
                        (["--lora-paths", "a=/x"], "lora_paths='a=/x': lora_paths is not supported"),
                        (["--enable-multimodal"], "enable_multimodal=True: SGLang's setting is not supported")):
        assert main(["serve", "--model-path", m, "--device", "cpu", "--port", "0", "--log-level", "error", *bad]) == 2
        assert needle in capsys.readouterr().err
