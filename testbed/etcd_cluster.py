"""A real etcd cluster for the lab: N members (3 by default) started as
subprocesses, each with its own data dir, on loopback (or on addresses the caller
gives, in a network namespace the caller made). What the shared store
(control/store/etcd.py) is tested and measured against: the store, fleet and
center fail-over tests, and the bench's fleet section. Used as a context manager;
at its end every member process is killed by pid and the data dirs are removed,
also on failure.

    with EtcdCluster() as cluster:
        store = open_store(cluster.url)
        cluster.kill_member(0); cluster.restart_member(0)
        cluster.compact(store.revision())
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from testbed.netns import free_port, netns_argv

_START_TIMEOUT_S = 30.0
# Short raft timings: a lost leader is replaced within about a second, and the
# minimum lease TTL (1.5 election timeouts, rounded up to a second) is 1 s.
_HEARTBEAT_MS = 50
_ELECTION_MS = 500


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    scheme: str = "http"
    process: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


class EtcdCluster:
    """`size` members on `hosts` (one address per member; loopback by default). With
    `netns`, the members run inside that namespace (`ip netns exec`), and the health
    checks too. With `tls` = (ca, cert, key) files, clients speak https to the members
    and must present a certificate signed by `ca` (mutual TLS); the cluster's own
    checks use `cert` and `key` as their client certificate. The members' data dirs and
    logs go in a new directory under `parent` (default: the system's temporary directory)."""

    def __init__(self, size: int = 3, hosts: tuple[str, ...] | None = None, netns: str | None = None,
                 tls: tuple[str, str, str] | None = None, parent: str | None = None) -> None:
        hosts = hosts or ("127.0.0.1",) * size
        if len(hosts) != size:
            raise ValueError(f"{size} members need {size} hosts, got {len(hosts)}")
        self.netns = netns
        self.tls = tls
        self._dir = tempfile.mkdtemp(prefix="xdpgw-etcd-", dir=parent)
        self.members = [Member(f"m{i}", host, free_port(), free_port(), os.path.join(self._dir, f"m{i}.data"),
                               os.path.join(self._dir, f"m{i}.log"), "https" if tls else "http")
                        for i, host in enumerate(hosts)]
        self._token: str | None = None

    @property
    def url(self) -> str:
        """The store URL naming every member: etcd://H:P,H:P,H:P."""
        return "etcd://" + ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    def member_url(self, i: int) -> str:
        """The store URL naming member `i` only."""
        m = self.members[i]
        return f"etcd://{m.host}:{m.client_port}"

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(len(self.members)):
            self._spawn(i, new=True)
        self.wait_healthy()

    def stop(self) -> None:
        """Kill every member (by pid) and remove the data dirs."""
        for i in range(len(self.members)):
            self.kill_member(i)
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill_member(self, i: int) -> None:
        """SIGKILL member `i` (no clean shutdown); its data dir stays for restart_member."""
        member = self.members[i]
        if member.process is not None:
            if member.process.poll() is None:
                os.kill(member.process.pid, signal.SIGKILL)
            member.process.wait(10)
            member.process = None

    def restart_member(self, i: int) -> None:
        """Start member `i` again on its data dir and wait until the cluster is healthy."""
        self._spawn(i, new=False)
        self.wait_healthy()

    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members if m.process is not None]

    def wait_healthy(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Until every running member reports healthy (it has a leader and serves a read)."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.process is not None]
        while pending:
            for m in pending:
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited with {m.process.returncode}: {self._tail(m)}")
            pending = [m for m in pending if not self._healthy(m)]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {[m.name for m in pending]} not healthy after {timeout} s: "
                                   f"{self._tail(pending[0])}")
            if pending:
                time.sleep(0.1)

    def compact(self, revision: int) -> None:
        """Compact the cluster's history up to `revision` (watches from before it get Compacted)."""
        if self.netns is not None:
            done = self._etcdctl([m for m in self.members if m.process is not None], "compact", str(revision),
                                 "--physical")
            if done.returncode != 0:
                raise RuntimeError(f"etcdctl compact {revision}: {done.stderr.strip()}")
            return
        self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def _etcdctl(self, members: list[Member], *argv: str, timeout_s: int = 5) -> subprocess.CompletedProcess:
        """etcdctl inside the members' namespace (netns mode: HTTP from this process cannot reach them)."""
        tls = [f"--cacert={self.tls[0]}", f"--cert={self.tls[1]}", f"--key={self.tls[2]}"] if self.tls else []
        endpoints = "--endpoints=" + ",".join(m.client_url for m in members)
        return subprocess.run(netns_argv(self.netns, ["etcdctl", endpoints, *tls, f"--command-timeout={timeout_s}s",
                                                      *argv]),
                              capture_output=True, text=True, timeout=4 * timeout_s)

    def enable_auth(self, password: str) -> None:
        """Turn on etcd's auth with the user "root" (role root) and `password`; this
        helper authenticates as root from then on."""
        self._post("/v3/auth/user/add", {"name": "root", "password": password})
        self._post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self._post("/v3/auth/enable", {})
        self._token = self._post("/v3/auth/authenticate", {"name": "root", "password": password})["token"]

    def _post(self, path: str, body: dict) -> dict:
        failures = []
        for m in self.members:
            if m.process is None:
                continue
            try:
                with self._urlopen(m, path, json.dumps(body).encode()) as reply:
                    return json.loads(reply.read())
            except (OSError, urllib.error.URLError) as exc:
                failures.append(f"{m.name}: {exc}")
        raise RuntimeError(f"no etcd member answered {path}: {failures}")

    def _urlopen(self, m: Member, path: str, data: bytes | None = None):
        if self.netns is not None:
            raise RuntimeError("HTTP from the test process cannot reach a member inside a namespace")
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls[0])
            context.load_cert_chain(self.tls[1], self.tls[2])
        headers = {"Authorization": self._token} if self._token else {}
        return urllib.request.urlopen(urllib.request.Request(m.client_url + path, data=data, headers=headers),
                                      timeout=3, context=context)

    def _healthy(self, m: Member) -> bool:
        if self.netns is None:
            try:  # /health: the member has a leader and serves a read (auth or not)
                with self._urlopen(m, "/health") as reply:
                    return json.loads(reply.read()).get("health") == "true"
            except (OSError, ValueError, urllib.error.URLError):
                return False
        return self._etcdctl([m], "endpoint", "health", timeout_s=2).returncode == 0

    def _spawn(self, i: int, new: bool) -> None:
        m = self.members[i]
        if m.process is not None:
            raise RuntimeError(f"etcd member {m.name} is running")
        argv = ["etcd", "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", ",".join(f"{x.name}={x.peer_url}" for x in self.members),
                "--initial-cluster-state", "new" if new else "existing",
                "--initial-cluster-token", os.path.basename(self._dir),
                "--heartbeat-interval", str(_HEARTBEAT_MS), "--election-timeout", str(_ELECTION_MS),
                "--logger", "zap", "--log-level", "warn"]
        if self.tls is not None:
            argv += ["--trusted-ca-file", self.tls[0], "--cert-file", self.tls[1], "--key-file", self.tls[2],
                     "--client-cert-auth"]
        if self.netns is not None:
            argv = netns_argv(self.netns, argv)
        with open(m.log_path, "ab") as log:
            m.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    @staticmethod
    def _tail(m: Member) -> str:
        try:
            with open(m.log_path, "rb") as f:
                return f.read()[-600:].decode(errors="replace")
        except OSError:
            return "(no log)"
