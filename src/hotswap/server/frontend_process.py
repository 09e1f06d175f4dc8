"""The HTTP front end in a process of its own (`hotswap serve`, unless --no-frontend-process), as SGLang runs its
tokenizer manager apart from its scheduler: uvicorn, request parsing, tokenization, output assembly, SSE and
streamed detokenization run there on a RemoteEngine; the engine's process keeps the scheduler and the model
and spends one message per step on the front end (engine/service.py). Hundreds of streams then no longer
hold the interpreter lock the scheduler thread needs between device steps.

Also the draining uvicorn server both ways of serving use."""

from __future__ import annotations

import dataclasses
import http.client
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_exit

from hotswap.engine.service import EngineInfo, EngineService
from hotswap.gc_policy import make_garbage_collections_rare
from hotswap.server.access import AccessPolicy
from hotswap.server.body_limit import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from hotswap.server.http_protocol import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S, bounded_protocol
from hotswap.server.metrics_share import MetricsShare

log = logging.getLogger("hotswap.server")


def make_draining_server(config, state, drain_timeout: float):
    """A uvicorn.Server whose first SIGTERM/SIGINT starts a drain: the port stays open and new requests (and
    /health, as SGLang answers during its graceful exit) get 503 while running requests finish for up to
    `drain_timeout` seconds; what is left is then aborted (streams end with finish_reason abort) and uvicorn
    closes the connections and returns. A second signal aborts what runs and exits at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_timer: threading.Timer | None = None
        drain_signal: tuple | None = None  # the first signal, handed to uvicorn once the drain is over
        drain_deadline = 0.0

        def handle_exit(self, sig, frame) -> None:  # called from the signal handler
            if state.draining:  # a second signal: end what runs and stop now (its streams get their abort chunk first,
                # unless the engine cannot answer: then uvicorn stops waiting for them after a second or two)
                threading.Thread(target=_abort_all, args=(state,), daemon=True).start()
                force = threading.Timer(2.0, setattr, args=(self, "force_exit", True))
                force.daemon = True
                force.start()
                super().handle_exit(sig, frame)
                return
            state.draining = True
            log.info("signal %s: draining for up to %.0f s (running requests finish, new ones get 503)", sig, drain_timeout)
            self.drain_signal, self.drain_deadline = (sig, frame), time.monotonic() + drain_timeout
            self.drain_timer = threading.Timer(drain_timeout, _abort_all, args=(state,))
            self.drain_timer.daemon = True
            self.drain_timer.start()

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            # uvicorn stops accepting once told to exit: keep serving 503s until every running request has ended
            # (or the aborts the drain timeout sent had a second to land), then let it close
            if self.drain_signal is not None and (not self.server_state.tasks or time.monotonic() > self.drain_deadline + 1.0):
                super().handle_exit(*self.drain_signal)
                return True
            return False

    return DrainingServer(config)


def _abort_all(state) -> None:
    try:
        out = state.engine.abort_request(abort_all=True)
        log.info("drain timeout: %s", out.message)
    except Exception as exc:  # noqa: BLE001 - the engine may already be down
        log.info("drain timeout: abort failed: %s", exc)


@dataclass(frozen=True, slots=True)
class FrontendOptions:
    """How the front end serves (create_app's and uvicorn's settings)."""

    host: str
    port: int
    api_key: str | None = None
    admin_api_key: str | None = None
    served_model_name: str | None = None
    policy: AccessPolicy = AccessPolicy()
    # create_app's (and serve's) bounds unless told otherwise: a front end process is no less exposed than the app in a thread
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    log_level: str = "warning"
    drain_timeout: float = 30.0
    worker: int = 0  # this front end's index among the server's (`--frontend-workers`)
    metrics_dir: str | None = None  # where the server's front ends share their route counters (several of them only)


def _frontend_main(conn, info: EngineInfo, options: FrontendOptions, sock: socket.socket) -> None:
    """The front end process: a RemoteEngine, the app on it, uvicorn on the socket the engine's process bound.
    Exits when uvicorn stops (SIGTERM drains first) or when the engine's side of the pipe closes."""
    import uvicorn

    from hotswap.engine.remote import RemoteEngine
    from hotswap.server.app import create_app

    os.setpgrp()  # a terminal's Ctrl-C reaches the engine's process only, which forwards it here once
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[frontend]: %(message)s")
    servers: list = []  # the uvicorn server once built: it stops if the engine's side of the pipe closes

    def stop_serving() -> None:
        for server in servers:
            server.should_exit = True

    engine = RemoteEngine(conn, info, on_close=stop_serving)
    share = None
    try:
        app = create_app(engine, api_key=options.api_key, admin_api_key=options.admin_api_key,
                         served_model_name=options.served_model_name, policy=options.policy,
                         max_body_bytes=options.max_body_bytes, body_timeout_s=options.body_timeout_s)
        config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level, lifespan="off",
                                timeout_graceful_shutdown=int(options.drain_timeout) + 10,
                                http=bounded_protocol(options.header_timeout_s, options.send_timeout_s))
        server = make_draining_server(config, app.state.hotswap, options.drain_timeout)
        servers.append(server)
        if options.metrics_dir is not None:
            share = app.state.hotswap.metrics_share = MetricsShare(options.metrics_dir, options.worker).start(app.state.hotswap.metrics)
        # uvicorn re-raises the signal that stopped it once it has shut down: take it here, so this process
        # closes its pipe and exits 0 instead of dying of it
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        if engine.failure() is None:
            server.run(sockets=[sock])
    finally:
        if share is not None:
            share.stop()
        engine.shutdown()
        sock.close()


class FrontendProcess:
    """Serve `engine` (in this process) over HTTP from a spawned front end process on the bound `sock` (which
    it owns from then on).

    with FrontendProcess(engine, sock, FrontendOptions(host, port)).start() as front:
        ...   # http://host:port serves until front.stop() (SIGTERM: drain, then exit)
    """

    def __init__(self, engine, sock: socket.socket, options: FrontendOptions, siblings: list[EngineService] | None = None):
        """`siblings`: the engine services of a FrontendGroup's processes, which this one's joins."""
        ctx = mp.get_context("spawn")  # never fork a process holding a CUDA context and threads
        ours, theirs = ctx.Pipe(duplex=True)
        self.options = options
        self.service = EngineService(engine, ours, siblings)
        self.process = ctx.Process(target=_frontend_main, args=(theirs, self.service.info, options, sock), name="hotswap-frontend")
        self._theirs = theirs
        self._sock = sock  # ours from here: closed by stop()
        self.address = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self, timeout: float = 180.0) -> FrontendProcess:
        """Start the process and wait until it answers /health (bounded; its failure to start is raised)."""
        return self.spawn().wait_healthy(timeout)

    def spawn(self) -> FrontendProcess:
        """Start the process without waiting for it (several front ends on one socket: FrontendGroup)."""
        make_garbage_collections_rare()  # this process's scheduler thread allocates per step as the front end does per token
        self.service.start()
        self.process.start()
        self._theirs.close()
        return self

    def wait_healthy(self, timeout: float = 180.0) -> FrontendProcess:
        """Wait until the socket answers /health (bounded); raise, stopped, if this process exits first. With
        several front ends on the socket, any of them may be the one that answers."""
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if not self.process.is_alive():
                self.stop()
                raise RuntimeError(f"the HTTP front end process exited during startup (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP front end did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)
        return self

    def _healthy(self) -> bool:
        host, port = self.address
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        """SIGTERM: the front end drains (running requests finish, new ones get 503) and exits; a second exits at once."""
        if self.process.is_alive():
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait up to `timeout` (default: the drain timeout plus 15 s), then kill; close the pipe and the socket."""
        if self.process.pid is not None:
            self.send_signal()
            self.process.join(self.options.drain_timeout + 15 if timeout is None else timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(10)
        self.service.close()
        self._sock.close()

    def __enter__(self) -> FrontendProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FrontendGroup:
    """`workers` front end processes accepting on one bound socket (`hotswap serve --frontend-workers`, SGLang's
    --tokenizer-worker-num): request parsing, tokenization, output assembly and SSE spread over several cores
    (one busy process does not lose throughput on streams, it coalesces their tokens into fewer chunks). Several
    share their route counters through a folder made here (server/metrics_share.py); `stop` removes it. One
    worker is exactly one FrontendProcess."""

    def __init__(self, engine, sock: socket.socket, options: FrontendOptions, workers: int = 1):
        if workers < 1:
            raise ValueError(f"a front end group needs at least one worker, got {workers}")
        self.metrics_dir = tempfile.mkdtemp(prefix="hotswap-metrics-") if workers > 1 else None
        services: list[EngineService] = []  # each tells the others' front ends what only it saw (a new model path)
        self.fronts = [FrontendProcess(engine, sock if i == 0 else sock.dup(), dataclasses.replace(options, worker=i, metrics_dir=self.metrics_dir),
                                       services) for i in range(workers)]

    @property
    def url(self) -> str:
        return self.fronts[0].url

    @property
    def pids(self) -> list[int]:
        return [f.process.pid for f in self.fronts]

    def start(self, timeout: float = 180.0) -> FrontendGroup:
        """Start every process; return once the socket answers /health (any of them may answer first: the others
        join as they come up). Any failure to start stops them all and is raised."""
        try:
            for front in self.fronts:
                front.spawn()
            self.fronts[0].wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        for front in self.fronts:
            front.send_signal(signum)

    def wait_first_exit(self, until: Callable[[], object]) -> FrontendProcess | None:
        """Block until one of the processes exits (for whatever reason) and return it, its exit code read; or
        return None once `until()` is true (asked every second)."""
        while not (ended := wait_for_exit([f.process.sentinel for f in self.fronts], timeout=1.0)):
            if until():
                return None
        first = next(f for f in self.fronts if f.process.sentinel in ended)
        first.process.join(10)  # its sentinel can signal a moment before its exit status is there to read
        return first

    def stop(self, timeout: float | None = None) -> None:
        """Stop every process (SIGTERM: drain, then exit; see FrontendProcess.stop) and remove the shared folder."""
        for front in self.fronts:
            front.stop(timeout)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
