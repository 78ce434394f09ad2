"""Shared pieces of the center tests: a config document, and fake agents that record calls."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from control.center.config import parse_center_document

TOKEN = "t0ken"


def document(tmp_path, db: str | None = None, **center: Any) -> dict:
    image = tmp_path / "web-1.json"
    image.write_text('{"binds": ["tcp:198.19.0.10:8080"]}')
    return {
        "center": {"listen": "127.0.0.1:7300", "token": TOKEN, "db": db or str(tmp_path / "center.db"),
                   "retry_s": 0.01, "max_attempts": 3, **center},
        "weights": {"location": 2.0, "latency": 1.0},
        "region": [{"name": "r1", "lat": 50.1, "lon": 8.7}, {"name": "r2", "lat": 40.7, "lon": -74.0}],
        "datacenter": [
            {"name": "dc1", "lat": 50.1, "lon": 8.7, "timezone": "Europe/Berlin", "capacity": 10, "load": 9,
             "tunnel_endpoint": "198.18.0.2"},
            {"name": "dc2", "lat": 48.1, "lon": 11.6, "timezone": "Europe/Berlin", "capacity": 16, "load": 2,
             "latency_ms": 5.0, "transmit_mbps": 10000, "tunnel_endpoint": "198.18.200.2",
             "agent": "http://198.18.200.2:7302", "agent_token": "dc2tok"},
            {"name": "dc3", "lat": 35.7, "lon": 139.7, "timezone": "Asia/Tokyo", "capacity": 16, "load": 2,
             "latency_ms": 150.0, "transmit_mbps": 1000, "tunnel_endpoint": "198.18.201.2",
             "agent": "http://198.18.201.2:7302", "agent_token": "dc3tok"},
        ],
        "gateway": [{"name": "gw1", "datacenter": "dc1", "agent": "http://198.18.0.2:7301", "agent_token": "gwtok"}],
        "image": [{"service": "web", "name": "web-1", "path": str(image)}],
    }


def config(tmp_path, **kw):
    return parse_center_document(document(tmp_path, **kw), str(tmp_path))


NOON_UTC = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


class FakeAgents:
    """Agent factory: every agent records (url, command, args); `fail` = {command: times to fail}.
    A target keeps each prepared request's state (serving, draining, drained) as the agent
    contract says; a draining request reads `drained` at the `drain_polls`-th status call
    after the drain (None: it stays draining)."""

    def __init__(self, drain_polls: int | None = 1) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.times: list[float] = []          # time.time() of each call, as `calls`
        self.fail: dict[str, int] = {}
        self.images: dict[str, set[str]] = {}
        self.offloads: dict[tuple[str, str], tuple[str, str]] = {}
        self.requests: dict[int, str] = {}
        self.drain_polls = drain_polls
        self.polls: dict[int, int] = {}
        self.released: list[int] = []

    def __call__(self, url: str, token: str):
        agents = self

        class Agent:
            async def call(self, command: str, **args: Any) -> Any:
                agents.calls.append((url, command, args))
                agents.times.append(time.time())
                if agents.fail.get(command, 0) > 0:
                    agents.fail[command] -= 1
                    raise RuntimeError(f"{command} failed (injected)")
                if command == "images":
                    return [{"sha256": s} for s in agents.images.get(url, set())]
                if command == "image.put":
                    agents.images.setdefault(url, set()).add(args["sha256"])
                    return {"ok": True}
                if command == "prepare":
                    agents.requests[args["request"]] = "serving"
                    return {"vms": [f"dv{i + 1}" for i in range(args["vms"])], "request": args["request"]}
                if command == "drain":      # idempotent: a drained request stays drained
                    if agents.requests.get(args["request"], "serving") == "serving":
                        agents.requests[args["request"]] = "draining"
                    return {"request": args["request"], "state": "draining"}
                if command == "status":
                    return {"requests": {str(rid): {"state": agents.status(rid)} for rid in agents.requests}}
                if command == "release":
                    if agents.requests.pop(args["request"], None) is not None:
                        agents.released.append(args["request"])
                    return {"request": args["request"], "released": True}
                if command == "offload.set":
                    agents.offloads[(args["region"], args["service"])] = (args["endpoint"], args["encap"])
                    return args
                if command == "offload.clear":
                    if agents.offloads.pop((args["region"], args["service"]), None) is None:
                        raise RuntimeError("no offload for region")
                    return args
                raise RuntimeError(f"unknown command {command}")

        return Agent()

    def status(self, rid: int) -> str:
        """Request `rid`'s state in a status answer (each answer counts as one poll)."""
        if self.requests[rid] == "draining":
            self.polls[rid] = self.polls.get(rid, 0) + 1
            if self.drain_polls is not None and self.polls[rid] >= self.drain_polls:
                self.requests[rid] = "drained"
        return self.requests[rid]

    def commands(self) -> list[str]:
        return [c for _, c, _ in self.calls]
