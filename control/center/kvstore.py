"""The center's state on the store interface (control/store: etcd for a fleet, or its
SQLite backend): the same calls as control/center/store.py's Store, so the workflow and
the API do not know which one they use. Every replica reads and writes here; only the
leader drives the workflow.

    /xdpgw/center/datacenters/<name>, .../gateways/<name>, .../regions/<name>   the catalogue
    /xdpgw/center/images/<service>        the service's master image (content base64)
    /xdpgw/center/requests/<id>           a request, its workflow state and its history
    /xdpgw/center/open/<gw>/<region>/<service>   {"id", "at"}: the open request of that triple
    /xdpgw/center/next_id                 {"id"}: the last request id handed out

Every change is a compare-and-swap on the key's mod revision, retried on a conflict, so
replicas writing at once (a standby taking a request while the leader moves another, two
replicas creating the same request) never lose an update. A request and its history are
one key, so a transition and its log line are one write."""
from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any, Callable

from control.center.store import TERMINAL, holding, restarted
from control.store import Conflict, Store as KeyValue

PREFIX = "/xdpgw/center"
LEADER_KEY = f"{PREFIX}/leader"
CAS_TRIES = 50       # writers per key are a handful of replicas: a conflict is rare, 50 in a row is a bug
CLAIM_STALE_S = 15.0  # longer than the etcd backend's request window: a live claimant has written by then
CLAIM_WAIT_S = 0.01


class KvStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    def close(self) -> None:
        self.kv.close()

    # ---- keys and compare-and-swap -----------------------------------------
    @staticmethod
    def _key(kind: str, *names: Any) -> str:
        return "/".join((PREFIX, kind, *map(str, names)))

    def _update(self, key: str, change: Callable[[dict | None], dict | None], own: bool = False) -> dict | None:
        """Write change(current value) to `key` if nobody wrote it in between (else read
        again and retry); change returns None: nothing to write. The value written, or None.
        `own`: see _swap."""
        for _ in range(CAS_TRIES):
            entry = self.kv.get(key)
            new = change(None if entry is None else entry.value)
            if new is None:
                return None
            if self._swap(key, new, 0 if entry is None else entry.mod_revision, own):
                return new
        raise Conflict(f"{key}: {CAS_TRIES} compare-and-swap conflicts in a row")

    def _swap(self, key: str, value: dict, mod_revision: int, own: bool) -> bool:
        """put_if; False if another write came first. etcd reports a write whose reply a
        failing member lost, retried on another, as a conflict though it was applied:
        when the value is `own` (no other writer can write the same: it holds an id
        handed out once, a timestamp), finding it in the key means it was ours."""
        try:
            self.kv.put_if(key, value, mod_revision)
            return True
        except Conflict:
            if not own:
                return False
            again = self.kv.get(key)
            return again is not None and again.value == value

    def _values(self, kind: str) -> list[dict]:
        entries, _ = self.kv.range(self._key(kind) + "/")
        return [e.value for e in entries]

    def _value(self, kind: str, name: Any) -> dict | None:
        entry = self.kv.get(self._key(kind, name))
        return None if entry is None else entry.value

    # ---- catalogue -------------------------------------------------------
    def put_datacenter(self, dc: dict) -> None:
        self._update(self._key("datacenters", dc["name"]), lambda old: restarted(dc, old))

    def set_datacenter(self, dc: dict) -> None:
        self.kv.put(self._key("datacenters", dc["name"]), dc)

    def datacenter(self, name: str) -> dict | None:
        return self._value("datacenters", name)

    def datacenters(self) -> list[dict]:
        return sorted(self._values("datacenters"), key=lambda d: d["name"])

    def hold_vms(self, name: str, request: int, vms: int) -> None:
        """The data center's load counts `vms` VMs for `request` (0: gives them back); idempotent."""
        self._update(self._key("datacenters", name), lambda dc: None if dc is None else holding(dc, request, vms))

    def put_gateway(self, gw: dict) -> None:
        self.kv.put(self._key("gateways", gw["name"]), gw)

    def gateway(self, name: str) -> dict | None:
        return self._value("gateways", name)

    def put_region(self, region: dict) -> None:
        self.kv.put(self._key("regions", region["name"]), region)

    def region(self, name: str) -> dict | None:
        return self._value("regions", name)

    def put_image(self, service: str, name: str, content: bytes) -> dict:
        meta = {"service": service, "name": name, "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content)}
        self.kv.put(self._key("images", service), {**meta, "content": base64.b64encode(content).decode()})
        return meta

    def image(self, service: str, with_content: bool = False) -> dict | None:
        """The service's master image (the last one put)."""
        value = self._value("images", service)
        if value is None:
            return None
        out = {k: value[k] for k in ("service", "name", "sha256", "size")}
        if with_content:
            out["content"] = base64.b64decode(value["content"])
        return out

    def images(self) -> list[dict]:
        return sorted(({k: v[k] for k in ("service", "name", "sha256", "size")} for v in self._values("images")),
                      key=lambda i: i["service"])

    # ---- requests --------------------------------------------------------
    @staticmethod
    def _public(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "history"}

    def _next_id(self) -> int:
        return self._update(self._key("next_id"), lambda v: {"id": (v or {"id": 0})["id"] + 1})["id"]

    def create_request(self, gateway: str, region: str, service: str, data: dict) -> tuple[dict, bool]:
        """A new request, or the open one of the same (gateway, region, service): (request, created).
        The triple's `open` key is claimed first (compare-and-swap), so two replicas asked
        at once create one request; a claim whose request was not written within
        CLAIM_STALE_S (its claimant died) counts as free."""
        index = self._key("open", gateway, region, service)
        for _ in range(CAS_TRIES):
            entry = self.kv.get(index)
            if entry is not None:
                req = self.request(entry.value["id"])
                if req is not None and req["state"] not in TERMINAL and not req["clear_requested"]:
                    return req, False
                if req is None and time.time() - entry.value["at"] < CLAIM_STALE_S:
                    time.sleep(CLAIM_WAIT_S)      # its claimant is writing it now
                    continue
            rid = self._next_id()
            if not self._swap(index, {"id": rid, "at": time.time()}, 0 if entry is None else entry.mod_revision,
                              own=True):
                continue
            now = time.time()
            record = {"id": rid, "gateway": gateway, "region": region, "service": service, "state": "requested",
                      "target": None, "attempts": 0, "error": None, "clear_requested": False, "created_at": now,
                      "updated_at": now, "next_try_at": 0, "data": data,
                      "history": [{"at": now, "state": "requested", "note": json.dumps(data)}]}
            if not self._swap(self._key("requests", rid), record, 0, own=True):
                raise Conflict(f"request {rid} was written by someone else")   # ids are handed out once
            return self._public(record), True
        raise Conflict(f"{index}: {CAS_TRIES} compare-and-swap conflicts in a row")

    def _record(self, rid: int) -> dict | None:
        return self._value("requests", rid)

    def request(self, rid: int) -> dict | None:
        record = self._record(rid)
        return None if record is None else self._public(record)

    def requests(self, open_only: bool = False) -> list[dict]:
        return [self._public(r) for r in sorted(self._values("requests"), key=lambda r: r["id"])
                if not (open_only and r["state"] in TERMINAL)]

    def state_counts(self) -> dict[str, int]:
        """Requests per state (only states some request is in)."""
        counts: dict[str, int] = {}
        for r in self._values("requests"):
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        return dict(sorted(counts.items()))

    def _change(self, rid: int, change: Callable[[dict], None], note: str | None,
                state: str | None = None) -> dict:
        """Apply `change` to the request's record and log a history line (state: the new one,
        or the current), in one compare-and-swap."""
        def apply(record: dict | None) -> dict | None:
            if record is None:
                return None
            record = {**record, "data": dict(record["data"]), "history": list(record["history"])}
            change(record)
            record["updated_at"] = time.time()
            record["history"].append({"at": record["updated_at"], "state": state or record["state"], "note": note})
            return record
        record = self._update(self._key("requests", rid), apply, own=True)   # stamped with updated_at
        return None if record is None else self._public(record)

    def transition(self, rid: int, state: str, note: str | None = None, **fields: Any) -> dict:
        """Move a request to `state` (resetting attempts and error), with other fields
        (target, data: merged) set in the same write, and log it."""
        def change(record: dict) -> None:
            record["data"].update(fields.get("data", {}))
            record.update({k: v for k, v in fields.items() if k != "data"},
                          state=state, attempts=0, error=fields.get("error"), next_try_at=0)
        return self._change(rid, change, note, state)

    def record_failure(self, rid: int, error: str, next_try_at: float) -> dict:
        def change(record: dict) -> None:
            record.update(attempts=record["attempts"] + 1, error=error, next_try_at=next_try_at)
        return self._change(rid, change, f"error: {error}")

    def request_clear(self, rid: int) -> dict:
        return self._change(rid, lambda r: r.update(clear_requested=True, next_try_at=0), "clear requested")

    def reset_backoffs(self) -> int:
        """Every open request is due now (a new leader forgets the backoffs of the last one)."""
        n = 0
        for r in self.requests(open_only=True):
            self._update(self._key("requests", r["id"]),
                         lambda rec: None if rec is None or rec["state"] in TERMINAL else {**rec, "next_try_at": 0})
            n += 1
        return n

    def history(self, rid: int) -> list[dict]:
        record = self._record(rid)
        return [] if record is None else record["history"]
