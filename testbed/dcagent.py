"""The target data center's agent in the namespace testbed (dc2, the stand-in remote DC).

    python -m testbed.dcagent --netns P-dc2 --prefix P --listen 198.18.200.2:7302 --token T
        [--tls-cert F --tls-key F [--tls-ca F] | --insecure]

It serves the same agent API as a gateway daemon (control/api/http.py, POST /v1/cmd/<command>
with a token; the flags are those of the gateway's [agent]: on a non-loopback address TLS,
or --insecure in so many words) with a data center's command table, all of it open to the
center (the center's workflow calls each of these):

    status                         the VMs it runs, per request
    images                         the master images it holds [{service, name, sha256}]
    image.put                      {service, name, sha256, content (base64)}: store an image (checked)
    prepare                        {request, service, image (sha256), vms}: create the VMs, add them to
                                   the DC's tables; idempotent per request (a repeated call returns the
                                   same VMs); the answer is the completion report
    release                        {request}: stop and remove the request's VMs

An image is a JSON document {"binds": ["tcp:ADDR:PORT", ...]}: what the service's server
listens on. A VM is a namespace P-dvN with a veth dvN <-> eth0 to dc2 (198.18.(210+N).0/24),
the VIPs on its loopback and a server (testbed/kit.py SERVER_SCRIPT) named "dc2-dvN".
"The DC's tables" are dc2's kernel routes: each VIP of the image goes ECMP (layer-4 hash)
over the VMs (design option (b) of issue 7: dc2 keeps its IP-in-IP decapsulator, the
decapsulated packets are routed to the VMs, which answer the clients directly from the VIP).

The agent enters the namespace itself (setns, like `xdpgw run`), so it keeps the host's
mount namespace and can create namespaces. It stops its servers by pid on SIGTERM."""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading

from control.api.commands import CENTER, Scoped, scoped
from control.api.errors import NotFound
from control.gateway import GatewayError
from testbed.addresses import DC2_VM_ROLES

SERVER_IDLE_S = 120.0
SERVER_MAX_S = 900.0


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise GatewayError(f"{' '.join(argv)}: {p.stderr.strip()[:200]}")


def _sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


class DcAgent:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.images: dict[str, dict] = {}            # sha256 -> {service, name, sha256, content}
        self.requests: dict[int, dict] = {}          # request -> {service, vms: [...]}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.free = list(range(1, len(DC2_VM_ROLES) + 1))

    def commands(self) -> dict[str, Scoped]:
        own = {"status": lambda a: {"requests": {str(k): v for k, v in self.requests.items()}},
               "images": lambda a: [{k: v for k, v in i.items() if k != "content"} for i in self.images.values()],
               "image.put": self.image_put, "prepare": self.prepare, "release": self.release}
        return {name: scoped(handler, CENTER) for name, handler in own.items()}

    def image_put(self, a: dict) -> dict:
        try:
            content = base64.b64decode(a["content"], validate=True)
        except (KeyError, ValueError):
            raise GatewayError("image.put: 'content' must be base64") from None
        digest = hashlib.sha256(content).hexdigest()
        if digest != a.get("sha256"):
            raise GatewayError(f"image.put: content has sha256 {digest}, not {a.get('sha256')}")
        try:
            binds = json.loads(content)["binds"]
        except (ValueError, KeyError, TypeError):
            raise GatewayError("image.put: not an image (JSON with \"binds\")") from None
        self.images[digest] = {"service": a.get("service"), "name": a.get("name"), "sha256": digest, "binds": binds}
        return {"sha256": digest, "size": len(content)}

    def prepare(self, a: dict) -> dict:
        rid, vms = a.get("request"), a.get("vms")
        if not isinstance(rid, int) or not isinstance(vms, int) or not 1 <= vms <= 8:
            raise GatewayError("prepare: needs integer 'request' and 'vms' (1..8)")
        with self.lock:
            if rid in self.requests:
                return self.requests[rid]
            image = self.images.get(a.get("image"))
            if image is None:
                raise NotFound(f"unknown image {a.get('image')!r}: send it with image.put first")
            if len(self.free) < vms:
                raise GatewayError(f"prepare: only {len(self.free)} VM slots free")
            made = []
            try:
                for _ in range(vms):
                    n = self.free.pop(0)
                    made.append(n)
                    self._create_vm(n, image["binds"])
                self._route(image["binds"])
            except BaseException:
                for n in made:
                    self._remove_vm(n)
                raise
            self.requests[rid] = {"service": a.get("service"), "image": image["sha256"],
                                  "vms": [f"dv{n}" for n in made], "addresses": [f"198.18.{210 + n}.2" for n in made]}
            return self.requests[rid]

    def release(self, a: dict) -> dict:
        with self.lock:
            req = self.requests.pop(a.get("request"), None)
            if req is None:
                raise NotFound(f"unknown request {a.get('request')!r}")
            for name in req["vms"]:
                self._remove_vm(int(name[2:]))
            self._route(self.images[req["image"]]["binds"])
            return req

    # ---- the testbed side ------------------------------------------------
    def _ns(self, n: int) -> str:
        return f"{self.prefix}-dv{n}"

    def _create_vm(self, n: int, binds: list[str]) -> None:
        from pyroute2 import netns as pr_netns

        ns, dev = self._ns(n), f"dv{n}"
        pr_netns.create(ns)
        _run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "addr", "add", f"198.18.{210 + n}.1/24", "dev", dev])
        _run(["ip", "link", "set", dev, "up"])
        for argv in (["addr", "add", f"198.18.{210 + n}.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"], ["route", "add", "default", "via", f"198.18.{210 + n}.1"]):
            _run(["ip", "-n", ns, *argv])
        for addr in sorted({b.split(":", 1)[1].rsplit(":", 1)[0] for b in binds if "[" not in b}):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"])
        from testbed.kit import SERVER_SCRIPT

        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER_SCRIPT, f"dc2-dv{n}",
                                 str(SERVER_IDLE_S), str(SERVER_MAX_S), *binds],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        if not ready or proc.stdout.readline().strip() != b"ready":
            self._stop(proc)
            raise GatewayError(f"the server of VM dv{n} did not start")
        self.procs[f"dv{n}"] = proc

    def _route(self, binds: list[str]) -> None:
        """Each IPv4 VIP of the image: ECMP over the running VMs (or no route when none is left)."""
        vips = sorted({b.split(":", 1)[1].rsplit(":", 1)[0] for b in binds if "[" not in b})
        hops = [f"198.18.{210 + int(name[2:])}.2" for name in sorted(self.procs)]
        for vip in vips:
            if hops:
                via = ["via", hops[0]] if len(hops) == 1 else [w for h in hops for w in ("nexthop", "via", h)]
                _run(["ip", "route", "replace", f"{vip}/32", *via])
            else:
                subprocess.run(["ip", "route", "del", f"{vip}/32"], capture_output=True, timeout=10)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=3)
            except ProcessLookupError:
                pass
        for s in (proc.stdout, proc.stderr):
            if s:
                s.close()

    def _remove_vm(self, n: int) -> None:
        from pyroute2 import netns as pr_netns

        proc = self.procs.pop(f"dv{n}", None)
        if proc is not None:
            self._stop(proc)
        try:
            pr_netns.remove(self._ns(n))
        except OSError:
            pass
        if n not in self.free:
            self.free.append(n)
            self.free.sort()

    def close(self) -> None:
        for name in list(self.procs):
            self._remove_vm(int(name[2:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.dcagent")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-ca", help="mutual TLS: the CA that signs the center's client certificate")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP on a non-loopback address")
    args = ap.parse_args(argv)
    from control.api.http import AgentServer
    from control.config import ConfigError, parse_listen
    from control.config.validate import check_listener
    from dataplane.netns import enter_netns

    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_ca and not args.tls_cert):
        ap.error("--tls-cert and --tls-key go together, and --tls-ca needs them")
    try:
        check_listener(args.listen, "--listen", args.tls_cert is not None, args.insecure, "--insecure",
                       "give --tls-cert/--tls-key, or --insecure")
    except ConfigError as exc:
        ap.exit(2, f"{ap.prog}: {exc}\n")
    enter_netns(args.netns)
    # dc2 routes decapsulated packets to its VMs: forwarding on, L4 ECMP, no reverse-path check
    for key, value in (("net/ipv4/ip_forward", "1"), ("net/ipv4/fib_multipath_hash_policy", "1"),
                       ("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0"),
                       ("net/ipv4/conf/eth0/rp_filter", "0")):
        _sysctl(key, value)
    host, port = parse_listen(args.listen, "--listen")
    agent = DcAgent(args.prefix)
    server = AgentServer(host, port, args.token, agent.commands(), args.tls_cert, args.tls_key, args.tls_ca)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(f"xdpgw: dc agent up on {args.listen}", flush=True)
    try:
        done.wait()
    finally:
        server.close()
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
