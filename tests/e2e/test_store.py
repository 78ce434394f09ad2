"""The store's behaviour, the same suite on both backends: SQLite in a temp dir and
a real 3-member etcd cluster on loopback (testbed/etcd_cluster.py). Processes that
must die without cleaning up (a leader, a lease holder) are subprocesses killed by pid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from control.config import StoreConfig
from control.store import (Compacted, Conflict, Entry, Event, Store, StoreError, StoreTLS, open_configured,
                           open_store)
from testbed.etcd_cluster import EtcdCluster
from tests.certs import CA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT_S = 20.0  # bound on every wait for the store to do something
TTL_S = 1.0


@dataclass
class Backend:
    url: str
    cluster: EtcdCluster | None
    stores: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = open_store(self.url)
        self.stores.append(store)
        return store


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory(prefix="xdpgw-store-") as d:
            b = Backend(f"sqlite://{d}/state.db", None)
            yield b
            for s in b.stores:
                s.close()
    else:
        with EtcdCluster() as cluster:
            b = Backend(cluster.url, cluster)
            yield b
            for s in b.stores:
                s.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Child:
    """A Python subprocess running `code` against the store; killed by pid at the end."""

    def __init__(self, url: str, code: str) -> None:
        script = f"import sys, time\nfrom control.store import open_store\nstore = open_store({url!r})\n{code}\n" \
                 "print('ready', flush=True)\ntime.sleep(120)\n"
        self.process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()  # the child prints "ready" or dies (EOF)
        assert line.strip() == "ready", f"child failed (exit {self.process.poll()})"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def test_get_put_range_delete(backend: Backend) -> None:
    store = backend.open()
    assert store.get("/t/a") is None
    r1 = store.put("/t/a", {"n": 1})
    r2 = store.put("/t/b", {"n": 2, "tags": ["x", "y"]})
    store.put("/u/c", {"n": 3})
    assert r2 > r1
    assert store.get("/t/a").value == {"n": 1} and store.get("/t/a").mod_revision == r1
    entries, revision = store.range("/t/")
    assert [(e.key, e.value, e.mod_revision) for e in entries] == [
        ("/t/a", {"n": 1}, r1), ("/t/b", {"n": 2, "tags": ["x", "y"]}, r2)]
    assert revision == store.revision() > r2
    assert store.delete("/t/a") is True
    assert store.delete("/t/a") is False
    assert store.get("/t/a") is None
    assert [e.key for e in store.range("/t/")[0]] == ["/t/b"]
    with pytest.raises(Conflict):
        store.delete("/t/b", mod_revision=r1)
    assert store.delete("/t/b", mod_revision=r2) is True
    # a second client sees the same
    assert [e.key for e in backend.open().range("")[0]] == ["/u/c"]


def test_keys_and_delete_range(backend: Backend) -> None:
    """keys(): the first keys under a prefix in key order and how many there are;
    delete_range(): a key range as one revision, which a watch delivers as deletes;
    neighbouring prefixes untouched, an empty range no revision."""
    store = backend.open()
    for k in ("/h/03", "/h/01", "/h/05", "/h/02", "/h/04", "/hz", "/g/01"):
        store.put(k, {"k": k})
    assert store.keys("/h/", 2) == (["/h/01", "/h/02"], 5)
    assert store.keys("/h/", 0) == ([], 5)
    assert store.keys("/none/", 3) == ([], 0)
    events: list[Event] = []
    watch = store.watch("/h", store.revision() + 1, events.append)
    assert store.delete_range("/h/", "/h/04") == 3
    revision = store.revision()
    wait_until(lambda: len(events) == 3, "the watch delivers the three deletes")
    watch.cancel()
    assert [(e.kind, e.key, e.revision) for e in events] == \
        [("delete", k, revision) for k in ("/h/01", "/h/02", "/h/03")]
    assert [e.key for e in store.range("/")[0]] == ["/g/01", "/h/04", "/h/05", "/hz"]
    assert store.delete_range("/h/", "/h/04") == 0 and store.revision() == revision


def test_put_if_racing_writers_exactly_one_wins(backend: Backend) -> None:
    writers = [backend.open(), backend.open()]
    rounds = 30
    key = "/t/vm"
    barrier = threading.Barrier(2, timeout=WAIT_S)
    wins: list[list[int]] = [[], []]
    conflicts = [0, 0]

    def race(i: int) -> None:
        for n in range(rounds):
            barrier.wait()
            current = writers[i].get(key)
            barrier.wait()  # both have read the same mod_revision before either writes
            try:
                writers[i].put_if(key, {"round": n, "writer": i}, current.mod_revision if current else 0)
                wins[i].append(n)
            except Conflict:
                conflicts[i] += 1

    threads = [threading.Thread(target=race, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    assert sorted(wins[0] + wins[1]) == list(range(rounds))  # every round: exactly one winner
    assert sum(conflicts) == rounds
    last = writers[0].get(key).value
    assert last["round"] == rounds - 1 and (rounds - 1) in wins[last["writer"]]


def test_watch_in_order_and_resumes_after_member_killed(backend: Backend) -> None:
    writer, watcher = backend.open(), backend.open()
    start = writer.revision() + 1
    seen: list[Event] = []
    watch = watcher.watch("/t/", start, seen.append)
    written = []
    for n in range(200):
        if n == 100 and backend.cluster is not None:
            backend.cluster.kill_member(0)  # the member the watcher (and the writer) talk to first
        if n % 3 == 2:
            key = f"/t/{n - 1}"
            written.append(("delete", key, None, writer.delete(key) and writer.revision()))
        else:
            key = f"/t/{n}"
            value = {"n": n}
            written.append(("put", key, value, writer.put(key, value)))
        writer.put(f"/other/{n}", {"n": n})  # outside the prefix: never delivered
        if n == 150 and backend.cluster is not None:
            backend.cluster.restart_member(0)
    wait_until(lambda: len(seen) >= len(written), f"{len(written)} events")
    watch.cancel()
    assert [(e.kind, e.key, e.value, e.revision) for e in seen] == written
    assert watch.error is None


def test_watch_from_compacted_revision_relist_converges(backend: Backend) -> None:
    store = backend.open()
    for n in range(20):
        store.put(f"/t/{n}", {"n": n})
    store.delete("/t/3")
    store.compact(store.revision())
    lost = store.watch("/t/", 1, lambda e: None)
    assert lost.stopped.wait(WAIT_S)
    assert isinstance(lost.error, Compacted)
    # the recovery every watcher does: re-list, then watch from the list's revision
    entries, revision = store.range("/t/")
    state = {e.key: e.value for e in entries}
    applied: list[Event] = []

    def apply(event: Event) -> None:
        applied.append(event)
        if event.kind == "put":
            state[event.key] = event.value
        else:
            state.pop(event.key, None)

    watch = store.watch("/t/", revision + 1, apply)
    store.put("/t/3", {"n": 33})
    store.delete("/t/4")
    last = store.put("/t/5", {"n": 55})
    wait_until(lambda: applied and applied[-1].revision == last, "the last write")
    watch.cancel()
    assert state == {e.key: e.value for e in store.range("/t/")[0]}
    assert state["/t/3"] == {"n": 33} and "/t/4" not in state and state["/t/5"] == {"n": 55}


def test_lease_expires_and_deletes_its_keys(backend: Backend, children: list[Child]) -> None:
    store = backend.open()
    start = store.revision() + 1
    events: list[Event] = []
    watch = store.watch("/t/", start, events.append)
    held = store.lease(TTL_S)
    store.put("/t/kept", {"by": "us"}, lease=held.id)
    child = Child(backend.url, f"lease = store.lease({TTL_S})\n"
                               "store.put('/t/member-a', {'by': 'child'}, lease=lease.id)\n"
                               "store.put('/t/member-b', {'by': 'child'}, lease=lease.id)")
    children.append(child)
    child.wait_ready()
    assert {e.key for e in store.range("/t/")[0]} == {"/t/kept", "/t/member-a", "/t/member-b"}
    child.kill()  # its keep-alive dies with it
    wait_until(lambda: store.get("/t/member-a") is None and store.get("/t/member-b") is None,
               "the dead child's keys to expire")
    wait_until(lambda: sum(e.kind == "delete" for e in events) == 2, "the two delete events")
    watch.cancel()
    deletes = [e for e in events if e.kind == "delete"]
    assert {e.key for e in deletes} == {"/t/member-a", "/t/member-b"}
    assert deletes[0].revision == deletes[1].revision  # one expiry, one revision
    assert store.get("/t/kept") is not None and not held.lost.is_set()  # ours is kept alive
    held.revoke()
    assert store.get("/t/kept") is None


def test_campaign_one_leader_and_takeover_when_the_leader_dies(backend: Backend, children: list[Child]) -> None:
    store = backend.open()
    election = "/t/leader"
    first = Child(backend.url, f"leadership = store.campaign({election!r}, 'first', {TTL_S})")
    children.append(first)
    first.wait_ready()
    assert store.get(election).value["name"] == "first"
    # two more candidates in this process, each with its own client
    leaders: list[str] = []
    leaderships = {}

    def candidate(name: str) -> None:
        leaderships[name] = backend.open().campaign(election, name, TTL_S)
        leaders.append(name)

    threads = [threading.Thread(target=candidate, args=(name,)) for name in ("second", "third")]
    for t in threads:
        t.start()
    # the first leader lives: its lease is kept alive, nobody else takes over
    time.sleep(3 * TTL_S)
    assert leaders == [] and store.get(election).value["name"] == "first"
    first.kill()
    wait_until(lambda: len(leaders) == 1, "a new leader after the first died", timeout=TTL_S + 10)
    new = leaders[0]
    assert store.get(election).value["name"] == new
    time.sleep(3 * TTL_S)
    assert leaders == [new] and not leaderships[new].lost.is_set()  # still exactly one
    leaderships[new].resign()
    wait_until(lambda: len(leaders) == 2, "the last candidate after a resign")
    for t in threads:
        t.join(WAIT_S)
    last = leaders[1]
    assert store.get(election).value["name"] == last != new
    leaderships[last].resign()
    assert store.get(election) is None


def test_etcd_mutual_tls_and_auth(tmp_path: Path) -> None:
    ca, other_ca = CA(tmp_path / "ca", "store-ca"), CA(tmp_path / "other", "other-ca")
    # etcd's JSON gateway refuses a client certificate with a CommonName when auth is on (it
    # would otherwise read the CN as a user name): clients identify by user and password. The
    # members' certificate is also the cluster helper's client certificate.
    member, client = ca.issue("member", common_name=False), ca.issue("client", common_name=False)
    stranger = other_ca.issue("stranger", common_name=False)
    with EtcdCluster(tls=(ca.cert, member.cert, member.key)) as cluster:
        cluster.enable_auth("s3cret")
        password_file = tmp_path / "password"
        password_file.write_text("s3cret\n")
        store = open_configured(StoreConfig(cluster.url, ca=ca.cert, cert=client.cert, key=client.key,
                                            user="root", password_file=str(password_file)))
        try:
            revision = store.put("/t/a", {"n": 1})
            assert store.get("/t/a") == Entry("/t/a", {"n": 1}, revision)
        finally:
            store.close()
        with pytest.raises(StoreError, match="refused user 'root'"):
            open_store(cluster.url, tls=StoreTLS(ca.cert, client.cert, client.key), auth=("root", "wrong"))
        anonymous = open_store(cluster.url, tls=StoreTLS(ca.cert, client.cert, client.key))
        with pytest.raises(StoreError, match="permission denied"):
            anonymous.get("/t/a")
        # a client certificate from another CA: the members refuse the connection
        with pytest.raises(StoreError, match="certificate"):
            open_store(cluster.url, tls=StoreTLS(ca.cert, stranger.cert, stranger.key)).get("/t/a")
