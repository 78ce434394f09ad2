"""The gateway's link to the control center: the monitor's heavy/calm events become
calls to the center on a thread of its own, so a slow center never delays sampling.
The center then calls the gateway's agent API (control/api/http.py) to install or
clear the offload."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

from control.config import Config
from control.offload.monitor import Event

log = logging.getLogger(__name__)


class OffloadLink:
    """Sends the monitor's events to the control center, in order, on its own thread.

    heavy -> POST /v1/requests {gateway, region, service, pps, bps, crossed_at} (one per service)
    calm  -> POST /v1/requests/clear {gateway, region}
    A failed call is retried (bounded: `max_attempts`, `retry_s` apart); the last result
    of each region is kept for `xdpgw stats`."""

    def __init__(self, config: Config, services: list[str], call: Callable[[str, str, dict | None], Any] | None = None,
                 max_attempts: int = 20, retry_s: float = 0.5) -> None:
        from control.center.client import CenterClient

        self.gateway = config.gateway.name
        self.services = services
        link = config.center
        self.call = call or CenterClient(link.url, link.token, timeout=link.timeout, cafile=link.cafile).call
        self.max_attempts = max_attempts
        self.retry_s = retry_s
        self.queue: queue.Queue[Event | None] = queue.Queue()
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="xdpgw-offload-link", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout=5)

    def submit(self, event: Event) -> None:
        self.queue.put(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self.queue.get()
            if event is None:
                return
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        if event.kind == "heavy":
            calls = [("POST", "/v1/requests", {"gateway": self.gateway, "region": event.region, "service": s,
                                               "pps": event.pps, "bps": event.bps, "crossed_at": event.crossed_at,
                                               "heavy_at": event.at}) for s in self.services]
        else:
            calls = [("POST", "/v1/requests/clear", {"gateway": self.gateway, "region": event.region})]
        results, error = [], None
        for method, path, body in calls:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    results.append(self.call(method, path, body))
                    error = None
                    break
                except Exception as exc:  # noqa: BLE001 - reported in stats, retried
                    error = f"{method} {path}: {exc}"
                    status = getattr(exc, "status", None)
                    if status is not None and 400 <= status < 500:
                        break          # the center refused it: retrying will not help
                    log.warning("center call failed (attempt %d): %s", attempt, error)
                    if self._stop.wait(self.retry_s):
                        return
        with self._lock:
            self.status[event.region] = {"event": event.kind, "at": event.at, "ok": error is None,
                                         "error": error, "results": results}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self.status.items()}
