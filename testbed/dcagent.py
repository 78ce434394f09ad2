"""The target data center's agent in the namespace testbed (dc2, the remote DC).

    python -m testbed.dcagent --netns P-dc2 --prefix P --listen 198.18.200.2:7302 --token T
        [--tls-cert F --tls-key F [--tls-ca F] | --insecure] [--gateway-socket PATH] [--drain-idle S]

It serves the same agent API as a gateway daemon (control/api/http.py, POST /v1/cmd/<command>
with a token; the flags are those of the gateway's [agent]: on a non-loopback address TLS,
or --insecure in so many words) with a data center's command table, all of it open to the
center (the center's workflow calls each of these):

    status                         per request: {service, vms, addresses, state}, state serving,
                                   draining or drained
    images                         the master images it holds [{service, name, sha256}]
    image.put                      {service, name, sha256, content (base64)}: store an image (checked)
    prepare                        {request, service, image (sha256), vms}: create the VMs, add them to
                                   the DC's tables; idempotent per request (a repeated call returns the
                                   same VMs); the answer is the completion report
    drain                          {request}: no new flows to the request's VMs; the request is drained
                                   once none of them got a packet for --drain-idle seconds
    release                        {request}: remove the request's VMs from the DC's tables and stop them;
                                   idempotent (an unknown request is released already)

An image is a JSON document {"binds": ["tcp:ADDR:PORT", ...]}: what the service's server
listens on. A VM is a namespace P-dvN whose eth0 is a veth to dvN in dc2 (testbed/addresses.py
dc2_vm, made by testbed/ports.py), the VIPs on its loopback and a server (testbed/kit.py
SERVER_SCRIPT) named "dc2-dvN". "The DC's tables" are dc2's xdpgw (Testbed(dc2_gateway=True),
testbed/config.py dc2_config), called on its unix socket: each bind of the image is a service
there (added when dc2 does not serve it yet, `service.add`), each VM a VM port of the gateway
(`vm.add` with the services it joins); dc2's gateway decapsulates the tunnelled flows, picks
a VM by Maglev and the VM answers the client from the VIP (DSR, routed by dc2).

The agent enters the namespace itself (setns, like `xdpgw run`), so it keeps the host's
mount namespace and can create namespaces. It stops its servers by pid on SIGTERM."""
from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import threading
from typing import Any

from control.api import unix as api
from control.api.commands import CENTER, Scoped, scoped
from control.api.errors import NotFound
from control.gateway import GatewayError
from testbed.addresses import DC2_VM_NUMBERS, Vm, dc2_vm
from testbed.config import DC2_GATEWAY, api_socket
from testbed.netns import run_in_netns
from testbed.ports import add_port, own_port, switch_to
from testbed.topology import sysctls_for, write_sysctls

SERVER_IDLE_S = 120.0
SERVER_MAX_S = 900.0
DRAIN_IDLE_S = 5.0


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise GatewayError(f"{' '.join(argv)}: {p.stderr.strip()[:200]}")


def _binds(binds: list[str]) -> list[tuple[str, str, int]]:
    """(protocol, address, port) of each of an image's binds "tcp:ADDR:PORT" (IPv6 ADDR in brackets)."""
    out = []
    for spec in binds:
        proto, rest = spec.split(":", 1)
        addr, port = rest.rsplit(":", 1)
        out.append((proto, str(ipaddress.ip_address(addr.strip("[]"))), int(port)))
    return out


class DcAgent:
    def __init__(self, prefix: str, gateway_socket: str, drain_idle: float = DRAIN_IDLE_S) -> None:
        self.prefix = prefix
        self.gateway_socket = gateway_socket
        self.drain_idle = drain_idle
        self.images: dict[str, dict] = {}            # sha256 -> {service, name, sha256, binds}
        self.requests: dict[int, dict] = {}          # request -> {service, image, vms, addresses, state}
        self.services: dict[int, list[str]] = {}     # request -> the gateway's services its VMs are in
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.free = list(DC2_VM_NUMBERS)

    def commands(self) -> dict[str, Scoped]:
        own = {"status": self.status,
               "images": lambda a: [{k: v for k, v in i.items() if k != "binds"} for i in self.images.values()],
               "image.put": self.image_put, "prepare": self.prepare, "drain": self.drain, "release": self.release}
        return {name: scoped(handler, CENTER) for name, handler in own.items()}

    def _gateway(self, cmd: str, **args: Any) -> Any:
        try:
            return api.call(self.gateway_socket, cmd, **args)
        except api.ApiError as exc:
            raise GatewayError(f"dc2's gateway, {cmd}: {exc}") from None

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
            _binds(binds)
        except (ValueError, KeyError, TypeError):
            raise GatewayError("image.put: not an image (JSON with \"binds\": [\"tcp:ADDR:PORT\", ...])") from None
        self.images[digest] = {"service": a.get("service"), "name": a.get("name"), "sha256": digest, "binds": binds}
        return {"sha256": digest, "size": len(content)}

    def prepare(self, a: dict) -> dict:
        rid, vms, service = a.get("request"), a.get("vms"), a.get("service")
        if not isinstance(rid, int) or not isinstance(vms, int) or not 1 <= vms <= len(DC2_VM_NUMBERS):
            raise GatewayError(f"prepare: needs integer 'request' and 'vms' (1..{len(DC2_VM_NUMBERS)})")
        if not isinstance(service, str) or not service:
            raise GatewayError("prepare: needs the 'service' (its name)")
        with self.lock:
            if rid in self.requests:
                return self.requests[rid]
            image = self.images.get(a.get("image"))
            if image is None:
                raise NotFound(f"unknown image {a.get('image')!r}: send it with image.put first")
            if len(self.free) < vms:
                raise GatewayError(f"prepare: only {len(self.free)} VM slots free")
            made = [self.free.pop(0) for _ in range(vms)]
            started: list[int] = []
            try:
                for n in made:
                    started.append(n)
                    self._create_vm(dc2_vm(self.prefix, n), image["binds"])
                self.services[rid] = self._add_to_gateway(service, image["binds"], [dc2_vm(self.prefix, n)
                                                                                    for n in made])
            except BaseException:
                for n in started:
                    self._remove_vm(n)
                self.free = sorted(set(self.free) | set(made))
                raise
            self.requests[rid] = {"service": service, "image": image["sha256"],
                                  "vms": [f"dv{n}" for n in made],
                                  "addresses": [dc2_vm(self.prefix, n).ip for n in made], "state": "serving"}
            return self.requests[rid]

    def status(self, a: dict) -> dict:
        """Every request; a draining one becomes drained once all its VMs are idle at dc2's gateway."""
        with self.lock:
            draining = [r for r in self.requests.values() if r["state"] == "draining"]
            if draining:
                try:
                    idle = {v["name"]: v["idle_s"] for v in self._gateway("vm.list")}
                except KeyError:
                    raise GatewayError("dc2's gateway, vm.list: no 'idle_s' in its rows") from None
                for req in draining:
                    # None: the VM never got a packet, as idle as it gets
                    if all(idle.get(vm) is None or idle[vm] >= self.drain_idle for vm in req["vms"]):
                        req["state"] = "drained"
            return {"requests": {str(k): v for k, v in self.requests.items()}}

    def drain(self, a: dict) -> dict:
        rid = a.get("request")
        with self.lock:
            req = self.requests.get(rid)
            if req is None:                 # released already (or never prepared): nothing of it serves
                return {"request": rid, "state": "drained"}
            if req["state"] == "serving":
                for vm in req["vms"]:
                    self._gateway("vm.state", name=vm, state="draining")
                req["state"] = "draining"
            return {"request": rid, "state": req["state"]}

    def release(self, a: dict) -> dict:
        rid = a.get("request")
        with self.lock:
            req = self.requests.get(rid)
            if req is not None:
                self._withdraw(self.services[rid], req["vms"], rid)
                for name in req["vms"]:
                    self._remove_vm(int(name[2:]))
                del self.requests[rid], self.services[rid]
            return {"request": rid, "released": True}

    # ---- dc2's gateway
    def _add_to_gateway(self, service: str, binds: list[str], vms: list[Vm]) -> list[str]:
        """The VMs as VM ports of dc2's gateway, in the image's services (added where dc2
        does not serve them yet, one per bind: `service`, or `service`.K for an image of
        several binds). Returns the services' names."""
        wanted = {service if len(binds) == 1 else f"{service}.{k}": b for k, b in enumerate(_binds(binds))}
        served = set(self._gateway("maglev.tables"))
        joined = [name for name in wanted if name in served]
        added_vms: list[str] = []
        added_services: list[str] = []
        try:
            for vm in vms:
                self._gateway("vm.add", name=vm.name, port=vm.port, mac=vm.mac, ips=[vm.ip, vm.ip6], services=joined)
                added_vms.append(vm.name)
            for name, (proto, vip, port) in wanted.items():
                if name not in served:
                    self._gateway("service.add", name=name, vip=vip, port=port, protocol=proto,
                                  vms=[vm.name for vm in vms])
                    added_services.append(name)
        except BaseException:
            self._withdraw(added_services, added_vms, None)
            raise
        return list(wanted)

    def _withdraw(self, services: list[str], vms: list[str], rid: int | None) -> None:
        """Take `vms` out of dc2's gateway, and first each of `services` that no other
        request's VMs are in (a service cannot be left without VMs)."""
        others = {name for r, names in self.services.items() if r != rid for name in names}
        for name in services:
            if name not in others:
                self._gateway("service.remove", name=name)
        for name in vms:
            self._gateway("vm.remove", name=name)

    # ---- the testbed side
    def _create_vm(self, vm: Vm, binds: list[str]) -> None:
        from pyroute2 import netns as pr_netns

        pr_netns.create(vm.ns)
        run_in_netns(vm.ns, write_sysctls, sysctls_for(vm.name), timeout=10)
        port = own_port(vm)
        add_port(port)                     # from dc2's namespace, the agent's own
        switch_to(port)
        _run(["ip", "-n", vm.ns, "link", "set", "lo", "up"])
        addrs = {a for _, a, _ in _binds(binds)}
        for addr in sorted(addrs):
            _run(["ip", "-n", vm.ns, "addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "lo"])
        from testbed.kit import SERVER_SCRIPT

        proc = subprocess.Popen(["ip", "netns", "exec", vm.ns, sys.executable, "-c", SERVER_SCRIPT, f"dc2-{vm.name}",
                                 str(SERVER_IDLE_S), str(SERVER_MAX_S), *binds],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.procs[vm.name] = proc
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise GatewayError(f"the server of VM {vm.name} did not start")

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

        vm = dc2_vm(self.prefix, n)
        proc = self.procs.pop(vm.name, None)
        if proc is not None:
            self._stop(proc)
        try:
            pr_netns.remove(vm.ns)         # its veth (and dc2's end, dvN) goes with it
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
    ap.add_argument("--gateway-socket", help="dc2's gateway API (default: the testbed's, testbed/config.py)")
    ap.add_argument("--drain-idle", type=float, default=DRAIN_IDLE_S,
                    help="seconds without a packet after which a draining VM is drained")
    args = ap.parse_args(argv)
    from control.api.http import AgentServer
    from control.config import ConfigError, parse_listen
    from control.config.validate import check_listener
    from dataplane.netns import enter_netns

    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_ca and not args.tls_cert):
        ap.error("--tls-cert and --tls-key go together, and --tls-ca needs them")
    if args.drain_idle < 0:
        ap.error("--drain-idle must be >= 0")
    try:
        check_listener(args.listen, "--listen", args.tls_cert is not None, args.insecure, "--insecure",
                       "give --tls-cert/--tls-key, or --insecure")
    except ConfigError as exc:
        ap.exit(2, f"{ap.prog}: {exc}\n")
    enter_netns(args.netns)
    host, port = parse_listen(args.listen, "--listen")
    agent = DcAgent(args.prefix, args.gateway_socket or api_socket(args.prefix, DC2_GATEWAY), args.drain_idle)
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
