"""The route counters of several front end processes (`hotswap serve --frontend-workers N`), summed.

Why: with N front end processes accepting on one socket, a Prometheus scrape reaches whichever accepts it;
each process counts only the requests it served. Each publishes its counters to a file of a folder the
engine's process made for them (atomically, every `interval_s` and when it stops); /metrics adds the other
processes' latest files to its own live counters, so every scrape shows the whole server, at most
`interval_s` behind for the others' requests. The folder holds only our own JSON (no pickle)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from hotswap.server.metrics import Metrics

log = logging.getLogger("hotswap.server")

PUBLISH_INTERVAL_S = 0.5


class MetricsShare:
    """One front end process's view of the shared folder: it writes `worker-<index>.json`, reads the others."""

    def __init__(self, folder: str, worker: int, interval_s: float = PUBLISH_INTERVAL_S):
        self.folder = Path(folder)
        self.worker = worker
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, worker: int) -> Path:
        return self.folder / f"worker-{worker}.json"

    def publish(self, metrics: Metrics) -> None:
        """Write this process's counters (a reader sees the previous file or this one, never a part)."""
        tmp = self.folder / f".worker-{self.worker}.json.tmp"
        tmp.write_text(json.dumps(metrics.snapshot()))
        os.replace(tmp, self._path(self.worker))

    def others(self) -> list[dict]:
        """The other processes' latest counters (a process that has not published yet counts nothing)."""
        snaps = []
        for path in sorted(self.folder.glob("worker-*.json")):
            if path == self._path(self.worker):
                continue
            try:
                snaps.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:  # gone with its folder at shutdown, or unreadable: skip it
                log.debug("metrics of %s not read: %s", path.name, exc)
        return snaps

    def total(self, mine: Metrics) -> Metrics:
        """A Metrics holding this process's live counters plus every other process's latest."""
        total = Metrics()
        total.absorb(mine.snapshot())
        for snap in self.others():
            total.absorb(snap)
        return total

    def start(self, metrics: Metrics) -> MetricsShare:
        """Publish `metrics` every `interval_s` from a daemon thread until `stop`."""

        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self._publish_quietly(metrics)
            self._publish_quietly(metrics)

        self._thread = threading.Thread(target=run, name="hotswap-metrics-share", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _publish_quietly(self, metrics: Metrics) -> None:
        try:
            self.publish(metrics)
        except OSError as exc:  # the folder is gone (the server is stopping): nothing to share any more
            log.debug("metrics not published: %s", exc)
