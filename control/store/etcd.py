"""The store on an etcd cluster (v3.4), spoken through etcd's v3 JSON gateway with
the standard library.

Why not a client library: python-etcd3 (gRPC) is unmaintained and does not work with
protobuf 4; etcd3gw (OpenStack, which also targets the JSON gateway) talks to one
endpoint (no fail-over between members), does not hand a watch's compact_revision to
the caller (needed to tell "re-list" from "reconnect"), and brings requests, futurist
and pbr along. What the store needs of the gateway is a handful of POSTs with base64
keys and values plus one streaming POST for watches: http.client does that with
keep-alive connections (one per thread and member), and the fail-over, the resume
and the compaction handling stay in view here.

Requests go to the member that answered last; on a connection error or a member
without a leader they go to the next, for up to REQUEST_WINDOW_S, then Unavailable.
A put_if whose reply was lost to a failing member and that is retried on another can
report Conflict although it was applied: re-read the key to tell.

TLS: https to the members with their CA, and optionally a client certificate (mutual
TLS). With etcd auth on, the gateway refuses a client certificate that has a
CommonName (it would not take it as the user name, as gRPC clients' is): issue client
certificates without CN and authenticate with user and password (a token)."""
from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from control.api.tls import client_ssl_context
from control.store import election
from control.store.base import (Compacted, Conflict, Entry, Event, Held, Lease, StoreError, StoreTLS, Unavailable,
                                Watch, encode, prefix_end)

log = logging.getLogger(__name__)

REQUEST_WINDOW_S = 10.0  # how long one request keeps trying the members before Unavailable
_ATTEMPT_TIMEOUT_S = 3.0  # one member's time to answer one request
_WATCH_IDLE_S = 30.0  # a watch stream silent this long is reconnected (a member cut off without a reset)
_RANGE_PAGE = 1000  # keys per range request (a page stays far below the gateway's message size limit)
# gRPC status codes the gateway reports (google.golang.org/grpc/codes)
_UNAVAILABLE, _UNAUTHENTICATED, _OUT_OF_RANGE, _NOT_FOUND = 14, 16, 11, 5
# Errors after which another member (or the same one a moment later) can succeed.
_RETRYABLE = ("leader changed", "no leader", "request timed out", "too many requests", "not capable",
              "not started", "stopped")


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class _Retry(Exception):
    """This member could not serve the request; try another."""


class EtcdStore:
    """The Store of control/store/__init__.py on the etcd members `endpoints` ("host:port")."""

    def __init__(self, endpoints: list[tuple[str, int]], tls: StoreTLS | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        if not endpoints:
            raise ValueError("an etcd store needs at least one endpoint")
        self.endpoints = endpoints
        self._ssl = client_ssl_context(tls.ca, tls.cert, tls.key) if tls is not None else None
        self._auth = auth
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._preferred = 0  # the member that answered last: where the next request goes first
        self._local = threading.local()  # this thread's connections, by member index
        self._held = Held()
        if auth is not None:
            self._authenticate()

    # ------------------------------------------------------------ key-value

    def get(self, key: str) -> Entry | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        """All keys under `prefix`, read in pages at one revision (a consistent snapshot)."""
        for _ in range(3):
            try:
                return self._range_pages(prefix.encode())
            except Compacted:
                continue  # compacted between two pages: read again at a newer revision
        raise Unavailable(f"range of {prefix}: compacted under every read")

    def _range_pages(self, prefix: bytes) -> tuple[list[Entry], int]:
        start, end = prefix, prefix_end(prefix)
        entries: list[Entry] = []
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(start or b"\0"), "range_end": _b64(end), "limit": _RANGE_PAGE}
            if revision:
                body["revision"] = revision
            reply = self._call("/v3/kv/range", body)
            revision = revision or int(reply["header"]["revision"])
            kvs = reply.get("kvs", [])
            entries += [_entry(kv) for kv in kvs]
            if not reply.get("more"):
                return entries, revision
            start = base64.b64decode(kvs[-1]["key"]) + b"\0"

    def keys(self, prefix: str, limit: int) -> tuple[list[str], int]:
        """One range request: etcd counts every key of the range, and returns the first `limit`."""
        key = prefix.encode()
        reply = self._call("/v3/kv/range", {"key": _b64(key or b"\0"), "range_end": _b64(prefix_end(key)),
                                            "limit": max(1, limit), "keys_only": True})
        return [_unb64(kv["key"]) for kv in reply.get("kvs", [])][:max(0, limit)], int(reply.get("count", 0))

    def revision(self) -> int:
        return int(self._call("/v3/kv/range", {"key": _b64("\0"), "count_only": True})["header"]["revision"])

    def put(self, key: str, value: dict, lease: int | None = None) -> int:
        return int(self._call("/v3/kv/put", _put_request(key, value, lease))["header"]["revision"])

    def put_if(self, key: str, value: dict, mod_revision: int, lease: int | None = None) -> int:
        return self._txn(key, mod_revision, {"request_put": _put_request(key, value, lease)})

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        request = {"key": _b64(key)}
        if mod_revision is None:
            return int(self._call("/v3/kv/deleterange", request).get("deleted", 0)) > 0
        self._txn(key, mod_revision, {"request_delete_range": request})
        return mod_revision != 0

    def delete_range(self, start: str, end: str) -> int:
        reply = self._call("/v3/kv/deleterange", {"key": _b64(start), "range_end": _b64(end)})
        return int(reply.get("deleted", 0))

    def _txn(self, key: str, mod_revision: int, operation: dict) -> int:
        reply = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
            "success": [operation],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if not reply.get("succeeded"):
            kvs = reply["responses"][0]["response_range"].get("kvs", [])
            current = int(kvs[0].get("mod_revision", 0)) if kvs else 0
            raise Conflict(f"{key}: mod_revision is {current}, not {mod_revision}")
        return int(reply["header"]["revision"])

    def compact(self, revision: int) -> None:
        """Drop the history before `revision`: watches from earlier revisions get Compacted."""
        try:
            self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        except Compacted:
            pass  # already compacted at least that far

    # ------------------------------------------------------------ leases and election

    def lease(self, ttl_s: float) -> Lease:
        """etcd counts TTLs in whole seconds (and has a minimum, from its election
        timeout): the TTL is rounded up, and the one granted is used."""
        if not ttl_s > 0:
            raise ValueError(f"a lease TTL must be > 0, got {ttl_s}")
        reply = self._call("/v3/lease/grant", {"TTL": str(math.ceil(ttl_s))})
        lease_id = int(reply["ID"])
        return self._held.lease(Lease(lease_id, float(reply["TTL"]), lambda: self._keep_alive(lease_id),
                                      lambda: self._call("/v3/lease/revoke", {"ID": str(lease_id)}, missing_ok=True)))

    def _keep_alive(self, lease_id: int) -> bool:
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, missing_ok=True)
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    def campaign(self, election_key: str, name: str, ttl_s: float,
                 stop: threading.Event | None = None) -> election.Leadership:
        return election.campaign(self, election_key, name, ttl_s, stop)

    # ------------------------------------------------------------ watch

    def watch(self, prefix: str, start_revision: int, on_event: Callable[[Event], None]) -> Watch:
        return self._held.watch(Watch(prefix, start_revision, on_event, self._run_watch))

    def _run_watch(self, watch: Watch) -> None:
        """Stream events; on a lost stream reconnect (to the next member) from watch.revision."""
        key = watch.prefix.encode()
        member = self._preferred
        pause = 0.0
        current: list[http.client.HTTPConnection] = []
        watch.on_cancel(lambda: current and _shutdown(current[0]))
        while not watch.cancelled:
            if pause and watch.wait_cancel(pause):
                return
            # connecting and creating the watch get one request's time (a member that
            # drops the connect is left as fast as a request leaves it); the stream then
            # gets its idle limit (_stream)
            conn = self._connect(member, _ATTEMPT_TIMEOUT_S)
            current[:] = [conn]
            try:
                self._stream(conn, watch, {"create_request": {
                    "key": _b64(key or b"\0"), "range_end": _b64(prefix_end(key)),
                    "start_revision": str(watch.revision)}})
                pause = 0.0
            except (_Retry, OSError, http.client.HTTPException, ValueError) as exc:
                if not watch.cancelled:
                    log.info("watch of %s on %s lost: %s; resuming from revision %d", watch.prefix,
                             self._name(member), exc, watch.revision)
                pause = min(1.0, pause * 2 or 0.05)
            finally:
                watch.connected.clear()
                conn.close()
            member = (member + 1) % len(self.endpoints)

    def _stream(self, conn: http.client.HTTPConnection, watch: Watch, request: dict) -> None:
        # hasleader: the member ends the stream when it loses its leader, so a watch on a
        # member cut off from the cluster moves to another instead of going quiet.
        conn.request("POST", "/v3/watch", json.dumps(request), self._headers({"Grpc-Metadata-hasleader": "true"}))
        response = conn.getresponse()
        if response.status != 200:
            raise _Retry(f"HTTP {response.status}: {response.read()[:200]!r}")
        conn.sock.settimeout(_WATCH_IDLE_S)
        decoder = json.JSONDecoder()
        buffer = ""
        while not watch.cancelled:
            chunk = response.read1(65536)
            if not chunk:
                raise _Retry("stream ended")
            buffer += chunk.decode()
            while buffer:
                buffer = buffer.lstrip()
                try:
                    message, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError:
                    break  # an incomplete message: wait for more
                buffer = buffer[end:]
                self._on_watch_message(message, watch)

    def _on_watch_message(self, message: dict, watch: Watch) -> None:
        if "error" in message:
            raise _Retry(f"watch error: {message['error']}")
        result = message.get("result", {})
        compact_revision = int(result.get("compact_revision", 0))
        if compact_revision:
            raise Compacted(watch.revision, compact_revision)
        if result.get("canceled"):
            raise _Retry(f"watch canceled by the member: {result.get('cancel_reason', '')}")
        if result.get("created"):
            watch.connected.set()
        watch.deliver([_event(e) for e in result.get("events", [])])

    # ------------------------------------------------------------ requests

    def _call(self, path: str, body: dict, missing_ok: bool = False) -> dict:
        """POST `body` to `path` on the first member that serves it; the reply as a dict.
        missing_ok: a "not found" error (a lease gone) is answered as an empty reply."""
        deadline = time.monotonic() + REQUEST_WINDOW_S
        reauthenticated = False
        failures: list[str] = []
        while True:
            first = self._preferred
            for k in range(len(self.endpoints)):
                if k and time.monotonic() >= deadline:
                    break  # the window holds per attempt, not per round of the members
                member = (first + k) % len(self.endpoints)
                try:
                    reply = self._once(member, path, body)
                except _Retry as exc:
                    failures.append(f"{self._name(member)}: {exc}")
                    continue
                except _Unauthenticated as exc:
                    if path == "/v3/auth/authenticate":
                        raise StoreError(f"etcd refused user {body['name']!r}: {exc}") from None
                    if self._auth is None or reauthenticated:
                        raise StoreError(f"etcd refused the credentials on {path}: {exc}") from None
                    self._authenticate()
                    reauthenticated = True
                    return self._call(path, body, missing_ok)
                except _NotFound as exc:
                    if missing_ok:
                        return {}
                    raise StoreError(str(exc)) from None
                self._preferred = member
                return reply
            if time.monotonic() >= deadline:
                raise Unavailable(f"no etcd member answered {path}: {'; '.join(failures[-len(self.endpoints):])}")
            time.sleep(0.1)

    def _once(self, member: int, path: str, body: dict) -> dict:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(member)
        if conn is None:
            conn = conns[member] = self._connect(member, _ATTEMPT_TIMEOUT_S)
        try:
            conn.request("POST", path, json.dumps(body), self._headers())
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            del conns[member]
            if isinstance(exc, ssl.SSLCertVerificationError) or "alert" in str(exc):
                # a certificate refused (theirs by us, ours by them): no other member will differ
                raise StoreError(f"TLS with etcd member {self._name(member)}: {exc}") from None
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            raise _Retry(f"HTTP {response.status}: not JSON: {data[:200]!r}") from None
        if response.status == 200 and "error" not in reply:
            return reply
        _raise_error(reply.get("error", reply))
        raise AssertionError("unreachable")

    def _connect(self, member: int, timeout: float) -> http.client.HTTPConnection:
        host, port = self.endpoints[member]
        if self._ssl is not None:
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = self._token
        return headers | (extra or {})

    def _authenticate(self) -> None:
        assert self._auth is not None
        user, password = self._auth
        with self._token_lock:
            self._token = None
            self._token = self._call("/v3/auth/authenticate", {"name": user, "password": password})["token"]

    def _name(self, member: int) -> str:
        host, port = self.endpoints[member]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Cancel the watches, revoke the leases still held, close this thread's connections."""
        self._held.release()
        for conn in self._local.__dict__.get("conns", {}).values():
            conn.close()


class _Unauthenticated(Exception):
    pass


class _NotFound(Exception):
    pass


def _raise_error(error: Any) -> None:
    """The gateway's error reply as the exception that says what to do about it."""
    if isinstance(error, dict):
        code, message = int(error.get("code", 0)), str(error.get("message") or error.get("error") or error)
    else:
        code, message = 0, str(error)
    if code == _UNAUTHENTICATED or "invalid auth token" in message or "authentication failed" in message:
        raise _Unauthenticated(message)
    if "required revision has been compacted" in message:
        raise Compacted(0, 0)
    if code == _NOT_FOUND or "not found" in message:
        raise _NotFound(message)
    if code == _UNAVAILABLE or any(s in message for s in _RETRYABLE):
        raise _Retry(message)
    raise StoreError(f"etcd: {message}")


def _shutdown(conn: http.client.HTTPConnection) -> None:
    """Unblock a thread reading `conn` (a watch being cancelled)."""
    if conn.sock is not None:
        conn.sock.shutdown(socket.SHUT_RDWR)


def _put_request(key: str, value: dict, lease: int | None) -> dict:
    request = {"key": _b64(key), "value": _b64(encode(value))}
    if lease is not None:
        request["lease"] = str(lease)
    return request


def _entry(kv: dict) -> Entry:
    return Entry(_unb64(kv["key"]), json.loads(base64.b64decode(kv.get("value", ""))), int(kv.get("mod_revision", 0)))


def _event(event: dict) -> Event:
    kv = event["kv"]
    if event.get("type") == "DELETE":
        return Event("delete", _unb64(kv["key"]), None, int(kv["mod_revision"]))
    return Event("put", _unb64(kv["key"]), json.loads(base64.b64decode(kv.get("value", ""))), int(kv["mod_revision"]))
