"""`hotswap serve`: build the Engine (with a progress bar), run uvicorn, drain on SIGTERM, shut down; drain and exit
non-zero when the engine can serve nothing more (`Engine.failure`: a dead or hung tensor-parallel worker, a stopped
scheduler, a step hung past `step_timeout_s`).

Also `ServerThread`, which runs the app on a loopback socket in a background thread (tests, notebooks).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hotswap.server.access import AccessPolicy, split_list
from hotswap.sglang_server_args import FLAG_ALIASES, FLOAT_FIELDS, NONE_DEFAULT_SWITCHES, SGLANG_DEFAULTS

if TYPE_CHECKING:  # the serving modules pull in torch; `hotswap --help` imports this one
    from hotswap.server.frontend_process import FrontendOptions

log = logging.getLogger("hotswap.server")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hotswap serve` options (SGLang's names where SGLang has them)."""
    from hotswap.server.body_limit import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
    from hotswap.server.http_protocol import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S
    parser.add_argument("--model-path", required=True,
                        help="local Hugging Face checkpoint folder (config.json, tokenizer, *.safetensors); "
                             "`hotswap make-tiny-model DIR` writes a tiny random one to try")
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the tokenizer's")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accepted for SGLang compatibility; hotswap never runs a checkpoint's own code")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=30000, help="port to listen on (default 30000; 0: any free port, printed)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None,
                        help="tensor-parallel ranks, one process and GPU each (cuda:N.. onwards; gloo ranks on the CPU); default 1")
    parser.add_argument("--load-format", default=None, choices=("auto", "dummy"),
                        help="'dummy': random weights of the checkpoint's shapes (benchmarks; config.json and tokenizer only)")
    parser.add_argument("--api-key", default=os.environ.get("HOTSWAP_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route but the /health, /ready and "
                             "/metrics probes (default: $HOTSWAP_API_KEY; an empty key is an error)")
    parser.add_argument("--admin-api-key", default=os.environ.get("HOTSWAP_ADMIN_API_KEY"),
                        help="SGLang's: the admin routes (weights, memory, pause, cache, abort, profiling) require this key instead "
                             "of --api-key; generation and status routes then need --api-key only if it is set (default: "
                             "$HOTSWAP_ADMIN_API_KEY)")
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated Host names accepted besides IP addresses and localhost ('*': any), "
                             "e.g. the name a proxy forwards")
    parser.add_argument("--allowed-origins", default="",
                        help="comma-separated browser origins allowed to call the server ('*': any); default: none")
    parser.add_argument("--save-root", action="append", default=[],
                        help="folder under which /save_sharded_model may write (repeatable); default: saves over HTTP are refused")
    parser.add_argument("--remote-model-stores", default="",
                        help="comma-separated URL prefixes /save_remote_model may write to, e.g. s3://bucket/ckpts; "
                             "default: refused")
    parser.add_argument("--max-running-requests", type=int, default=None, help="cap on requests in the running batch")
    parser.add_argument("--served-model-name", default=None, help="model name in OpenAI replies (default: the model path)")
    parser.add_argument("--page-size", type=int, default=None, help="KV-cache page size in tokens (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--num-pages", type=int, default=None, help="KV-cache pages (default: sized from free memory)")
    parser.add_argument("--log-level", default="info", choices=_LOG_LEVELS)
    parser.add_argument("--max-context-len", "--context-length", dest="max_context_len", type=int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--allow-auto-truncate", action="store_true",
                        help="cut a max_new_tokens past the context to fit instead of refusing the request (SGLang's flag)")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                        help="fraction of the GPU memory free after loading the weights that the KV cache takes (default 0.8)")
    parser.add_argument("--mem-fraction-static", type=float, default=None,
                        help="SGLang's sizing, in place of --kv-cache-memory-fraction: weights and KV cache together take this "
                             "fraction of the GPU memory free at start, the rest stays free")
    parser.add_argument("--weight-update-bucket-bytes", type=int, default=None,
                        help="largest bucket an update_weights_from_distributed call may carry, and the relay bucket to "
                             "tensor-parallel workers (default 1 GiB)")
    parser.add_argument("--cuda-ipc-cache-bytes", type=int, default=None,
                        help="producer memory kept mapped between CUDA IPC updates (default 1.5 GiB: IPCWeightPusher's three pack "
                             "buffers of 512 MiB); at least the pusher's calls_in_flight * bucket_bytes, or each call maps a buffer again")
    parser.add_argument("--weight-session-timeout-s", "--weight-update-session-timeout", dest="weight_session_timeout_s", type=float,
                        default=None, help="seconds an open begin_weight_update session may stay idle before it is rolled back (default 600)")
    parser.add_argument("--weight-update-drain-timeout-s", type=float, default=None,
                        help="seconds a weight update waits for started requests to finish before it is refused (default 600)")
    parser.add_argument("--attention-backend", default=None,
                        help="auto | torch | triton; SGLang's fa3, fa4, flashinfer, flex_attention and trtllm_mha run hotswap's own "
                             "GPU kernels, torch_native its PyTorch path")
    parser.add_argument("--disable-cuda-graph", action="store_true", help="run decode eagerly")
    parser.add_argument("--seed", "--random-seed", dest="seed", type=int, default=None, help="engine seed for requests without their own")
    parser.add_argument("--weight-version", default=None, help="the version name the launch weights carry (SGLang's; default 'default')")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let running requests finish before aborting them (default 30)")
    parser.add_argument("--enable-return-routed-experts", action="store_true",
                        help="MoE models: keep each token's routed experts so requests can ask for them (return_routed_experts)")
    parser.add_argument("--no-warmup", "--skip-server-warmup", dest="no_warmup", action="store_true",
                        help="skip the one-token warm-up generation at start")
    parser.add_argument("--stream-interval", type=int, default=None,
                        help="a streaming request gets an output every this many tokens (SGLang's name; default 1)")
    parser.add_argument("--incremental-streaming-output", action="store_true",
                        help="a streamed /generate chunk carries only its new text, output ids and logprobs, not everything so "
                             "far (SGLang's flag; off, each chunk repeats the whole output: O(length^2) bytes per stream)")
    parser.add_argument("--frontend-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the HTTP front end (uvicorn, tokenization, output assembly, SSE) in its own process, as SGLang "
                             "runs its tokenizer manager, so hundreds of streams do not hold the interpreter lock the scheduler needs "
                             "(default; --no-frontend-process serves HTTP from a thread of the engine's process)")
    parser.add_argument("--frontend-workers", type=int, default=None,
                        help="front end processes accepting on the port (SGLang's --tokenizer-worker-num): request parsing, "
                             "tokenization and output assembly spread over them (/metrics sums them). Default: 2 with the front "
                             "end in its own process with 4 or more cores to run on (one process is busy all the time at 512 "
                             "streams, and streams then lag), else 1")
    parser.add_argument("--max-queue-wait-s", type=float, default=None,
                        help="how long a request may queue while generation is paused or a weight-update session is open (default 300)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies are refused with 413 (default {DEFAULT_MAX_BODY_BYTES}; 0: no limit)")
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help=f"a request body not fully received within this many seconds is refused with 408, so a client that "
                             f"trickles its body cannot hold a connection (default {DEFAULT_BODY_TIMEOUT_S:g}; 0: no limit)")
    parser.add_argument("--header-timeout-s", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help=f"a connection that has not sent a whole request head within this many seconds of opening (or of its "
                             f"last reply) is closed, so idle or trickling clients cannot hold connections (default "
                             f"{DEFAULT_HEADER_TIMEOUT_S:g}; 0: no limit)")
    parser.add_argument("--send-timeout-s", type=float, default=DEFAULT_SEND_TIMEOUT_S,
                        help=f"a client that takes none of a reply's waiting bytes (a stream, a large body) for this many seconds "
                             f"is disconnected and its requests aborted (default {DEFAULT_SEND_TIMEOUT_S:g}; 0: no limit)")


def default_frontend_workers(frontend_process: bool) -> int:
    """Front end processes when --frontend-workers is not given: two where the front end runs apart and the machine has
    the cores (a 0.6B rollout of 512 streams on an H100: one process was busy 85 % of the run and the streams ended at
    1.26-1.28x the offline time; two, 1.01-1.03x), else one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # the ones this process may use
    return 2 if frontend_process and cores >= 4 else 1


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    kw: dict = {}
    for name in ("max_running_requests", "page_size", "num_pages", "max_context_len", "kv_cache_memory_fraction", "mem_fraction_static",
                 "attention_backend", "seed", "tensor_parallel_size", "load_format", "tokenizer_path", "chat_template",
                 "weight_update_bucket_bytes", "cuda_ipc_cache_bytes", "weight_session_timeout_s", "stream_interval", "max_queue_wait_s",
                 "weight_version", "weight_update_drain_timeout_s"):
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    if getattr(args, "allow_auto_truncate", False):
        kw["allow_auto_truncate"] = True
    if getattr(args, "disable_cuda_graph", False):
        kw["enable_cuda_graph"] = False
    if getattr(args, "enable_return_routed_experts", False):
        kw["enable_return_routed_experts"] = True
    if getattr(args, "incremental_streaming_output", False):
        kw["incremental_streaming_output"] = True
    kw.update(getattr(args, "sglang_args", None) or {})
    return kw


def sglang_flags(extra: list[str]) -> dict[str, object]:
    """SGLang launch_server flags `hotswap serve` has no option of its own for -> their ServerArgs names and values, typed
    as SGLang's defaults are (a flag without a value is true; several values are a list). The Engine then takes or refuses
    each by name (config.engine_args_from_sglang), so a framework's SGLang command line runs unchanged or fails naming
    what it asked for."""
    out: dict[str, object] = {}
    i = 0
    while i < len(extra):
        flag, i = extra[i], i + 1
        spelled, has_inline, inline = flag.removeprefix("--").partition("=")
        name = _sglang_field(spelled.replace("-", "_"), flag)
        values = [inline] if has_inline else []
        while not has_inline and i < len(extra) and not extra[i].startswith("--"):
            values.append(extra[i])
            i += 1
        default = float(SGLANG_DEFAULTS[name]) if name in FLOAT_FIELDS else SGLANG_DEFAULTS[name]
        if (isinstance(default, bool) or name in NONE_DEFAULT_SWITCHES) and not values:
            out[name] = True
            continue
        if not values:
            raise ValueError(f"--{name.replace('_', '-')} needs a value")
        typed = [_typed_like(v, default, flag) for v in values]
        out[name] = typed[0] if len(typed) == 1 else typed
    return out


def _sglang_field(spelled: str, flag: str) -> str:
    """The ServerArgs field a launch_server flag names: its own name, an alias, or (as SGLang's argparse takes them) a
    unique prefix of one."""
    if flag.startswith("--"):
        if spelled in SGLANG_DEFAULTS or spelled in FLAG_ALIASES:
            return FLAG_ALIASES.get(spelled, spelled)
        matches = sorted({FLAG_ALIASES.get(n, n) for n in (*SGLANG_DEFAULTS, *FLAG_ALIASES) if n.startswith(spelled)})
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(f"ambiguous argument {flag!r}: it could be --{', --'.join(m.replace('_', '-') for m in matches)}")
    raise ValueError(f"unrecognized argument {flag!r}: neither a hotswap serve option nor an SGLang server flag")


def _typed_like(text: str, default: object, flag: str) -> object:
    """`text` as the type of SGLang's default (a number where the default is None and it reads as one)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{flag} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"{flag} takes a number, got {text!r}") from None
    if default is None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def access_policy_from_args(args: argparse.Namespace) -> AccessPolicy:
    bound = (args.host,) if args.host else ()  # a server told to listen under a name answers to it
    return AccessPolicy(allowed_hosts=bound + split_list(getattr(args, "allowed_hosts", "")),
                        allowed_origins=split_list(getattr(args, "allowed_origins", "")),
                        save_roots=tuple(getattr(args, "save_root", None) or ()),
                        remote_model_stores=split_list(getattr(args, "remote_model_stores", "")))


class BindError(OSError):
    """The server cannot listen where it was told to (port in use, address not ours, no permission)."""


LISTEN_BACKLOG = 2048  # uvicorn's default


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose proto says TCP;
    # with Nagle on, every reply written as headers then body waited ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    # listening from here on: a client that connects once "serving on" is logged, before uvicorn's loop has
    # started, waits in the backlog until it accepts instead of being refused (while the model loads, a
    # connection waits there too, up to the client's own timeout)
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> None:
    """Build the Engine, serve it until SIGTERM/SIGINT, drain, shut the engine down."""
    from tqdm import tqdm

    from hotswap import Engine
    from hotswap.server.app import create_app
    from hotswap.server.frontend_process import FrontendOptions

    level = getattr(args, "log_level", "info") or "info"
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    admin_api_key = getattr(args, "admin_api_key", None)
    for flag, key in (("--api-key (or $HOTSWAP_API_KEY)", args.api_key), ("--admin-api-key (or $HOTSWAP_ADMIN_API_KEY)", admin_api_key)):
        if key is not None and not key.strip():
            raise ValueError(f"{flag} is empty: give a real key, or leave it unset to serve without one")
    host, port = args.host, int(args.port)
    frontend_process = bool(getattr(args, "frontend_process", True))
    workers = getattr(args, "frontend_workers", None)
    workers = default_frontend_workers(frontend_process) if workers is None else int(workers)
    if workers < 1 or (workers > 1 and not frontend_process):
        raise ValueError(f"--frontend-workers must be at least 1, and 1 with --no-frontend-process; got {workers}")
    drain = float(getattr(args, "drain_timeout", 30.0))
    if not drain <= threading.TIMEOUT_MAX:  # nan, inf and huge values would fail only once the model is loaded, or at SIGTERM
        raise ValueError(f"--drain-timeout must be a number of seconds up to {threading.TIMEOUT_MAX:.0f}; got {drain}")
    engine = app = None
    with tqdm(total=4, desc="hotswap", unit="step", bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:12}| {elapsed}{postfix}",
              disable=level in ("critical", "error")) as bar:
        bar.set_postfix_str(f"binding {host}:{port}")
        sock = bind_socket(host, port)  # fail fast, before loading anything, when the port is taken
        port = sock.getsockname()[1]  # the port the system chose for --port 0
        bar.update()
        try:
            bar.set_postfix_str(f"loading {args.model_path} (config, tokenizer, weights, KV cache)")
            engine = Engine(args.model_path, dtype=args.dtype, device=args.device, **engine_kwargs_from_args(args))
            bar.update()
            bar.set_postfix_str("warm-up generation")
            if not getattr(args, "no_warmup", False):
                probe = engine.eos_token_ids[0] if engine.eos_token_ids else 0
                # greedy, then sampled with logprobs (an RL rollout's shape): each compiles its sampling kernels here,
                # not on the first request that needs them
                engine.generate(input_ids=[probe], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
                engine.generate(input_ids=[probe], sampling_params={"max_new_tokens": 1, "temperature": 1.0}, return_logprob=True)
            bar.update()
            options = FrontendOptions(host=host, port=port, api_key=args.api_key, admin_api_key=admin_api_key,
                                      served_model_name=args.served_model_name,
                                      policy=access_policy_from_args(args), max_body_bytes=args.max_body_bytes,
                                      body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
                                      send_timeout_s=args.send_timeout_s, log_level=level,
                                      drain_timeout=max(0.0, float(getattr(args, "drain_timeout", 30.0))))
            if not frontend_process:  # else the front end process builds its own
                bar.set_postfix_str("building the app")
                app = create_app(engine, api_key=options.api_key, admin_api_key=options.admin_api_key,
                                 served_model_name=options.served_model_name, policy=options.policy,
                                 max_body_bytes=options.max_body_bytes, body_timeout_s=options.body_timeout_s)
            bar.update()
            bar.set_postfix_str(f"ready on http://{host}:{port}")
        except BaseException:
            sock.close()
            if engine is not None:
                engine.shutdown()
            raise
    keys = ", ".join(name for name, key in (("api key", args.api_key), ("admin api key", admin_api_key)) if key) or "no api key"
    # the line launchers and tests wait for: logged once requests are answered (a front end process takes seconds to start)
    serving = f"serving {args.model_path} on http://{host}:{port} ({keys})"
    try:
        if frontend_process:
            _serve_from_frontend_processes(engine, sock, options, workers, serving)
        else:
            log.info("%s", serving)  # the socket listens already: a request waits in its backlog until uvicorn accepts it
            _serve_in_process(app, sock, options, engine.failure)
        failure = engine.failure()
    finally:
        sock.close()
        engine.shutdown()
        log.info("engine shut down")
    if failure is not None:  # exit non-zero, so whatever runs the server restarts it
        raise RuntimeError(f"the server stopped: the engine can serve nothing any more: {failure}")


def _stop_on_failure(server, failure: Callable[[], str | None]) -> None:
    """Drain and stop the server once the engine can serve nothing any more: SGLang's server exits when a rank
    fails (its scheduler's SIGQUIT, or its watchdog's), rather than answer /health with 200 and every request with an abort."""
    while not server.should_exit:
        if (why := failure()) is not None:
            log.error("%s: stopping the server", why)
            server.handle_exit(signal.SIGTERM, None)
            return
        time.sleep(1.0)


def _serve_in_process(app, sock: socket.socket, options: FrontendOptions, failure: Callable[[], str | None]) -> None:
    """uvicorn in this process's main thread; returns once it has drained and stopped (also when `failure()` says why
    the engine can serve nothing any more)."""
    import uvicorn

    from hotswap.server.frontend_process import make_draining_server
    from hotswap.server.http_protocol import bounded_protocol

    # host and port only label uvicorn's "running on" line: it serves the socket bound above
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=int(options.drain_timeout) + 10, lifespan="off",
                            http=bounded_protocol(options.header_timeout_s, options.send_timeout_s))
    server = make_draining_server(config, app.state.hotswap, options.drain_timeout)
    threading.Thread(target=_stop_on_failure, args=(server, failure), name="hotswap-engine-watch", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handlers that
    # would kill the process before the engine shuts down, so take the re-raised signal here instead.
    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server.drain_timer is not None:
            server.drain_timer.cancel()
        if received:
            log.info("stopped by signal %d", received[0])


def _serve_from_frontend_processes(engine, sock: socket.socket, options: FrontendOptions, workers: int, serving: str) -> None:
    """`workers` spawned front end processes accepting on `sock` (FrontendGroup); SIGTERM/SIGINT here go to each
    as SIGTERM (the first drains, a second exits at once). Returns when they have exited: the first to exit, for
    whatever reason, takes the others down with it (drained); raises if it exited on its own with an error."""
    from hotswap.server.frontend_process import FrontendGroup

    group = FrontendGroup(engine, sock, options, workers)
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        group.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        group.start()
        log.info("%s; HTTP front end process(es) %s ready", serving, ", ".join(map(str, group.pids)))
        first = group.wait_first_exit(until=engine.failure)
        if first is None:  # the engine broke: the front ends drain (their /health answers 503) and exit
            log.error("%s: stopping the server", engine.failure())
            group.send_signal(signal.SIGTERM)
        elif not signalled:
            group.send_signal(signal.SIGTERM)
            if first.process.exitcode != 0:
                raise RuntimeError(f"the HTTP front end process {first.process.pid} exited with code {first.process.exitcode}")
    finally:
        group.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """Run an ASGI app with uvicorn on a freshly bound loopback socket in a daemon thread.

    with ServerThread(create_app(engine)) as srv:
        httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout_s: float | None = None, send_timeout_s: float | None = None):
        import uvicorn

        from hotswap.server.http_protocol import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S, bounded_protocol

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                                http=bounded_protocol(DEFAULT_HEADER_TIMEOUT_S if header_timeout_s is None else header_timeout_s,
                                                      DEFAULT_SEND_TIMEOUT_S if send_timeout_s is None else send_timeout_s))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="hotswap-http", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
