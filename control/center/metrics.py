"""The control center's metrics (served by control/metrics.py's MetricsServer):
distribution requests per state, read from the store at scrape time (one grouped
count), and the workflow's step latencies (control/events.py CenterEvents)."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from control.center.store import Store
from control.center.workflow import STATES
from control.events import CenterEvents
from control.metrics import gauge, histogram


def center_metrics(states: dict[str, int], events: CenterEvents) -> Iterator[Metric]:
    yield gauge("xdpgw_center_requests",
                "Distribution requests in each state (released, cleared and failed are final)", ["state"],
                (([s], states.get(s, 0)) for s in STATES))
    yield histogram("xdpgw_center_step_duration_seconds", "One step of a distribution request, by the state it "
                    "started in and its outcome (ok, error: retried later)", ["state", "outcome"], events.steps)


class CenterCollector(Collector):
    def __init__(self, store: Store, events: CenterEvents) -> None:
        self.store = store
        self.events = events

    def collect(self) -> Iterator[Metric]:
        return center_metrics(self.store.state_counts(), self.events)
