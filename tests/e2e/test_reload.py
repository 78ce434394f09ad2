"""Config reload on a running daemon (`xdpgw reload`, SIGHUP), the daemon with only
the systemd unit's capabilities, and the daemon run by `ip netns exec`: the real
daemon in the testbed, real TCP and UDP traffic.

The module's daemon starts with a smaller config (service web on vm1 and vm2,
region r1 only, no health checks); the tests then grow it by reloads and check,
through traffic and the API, that the change took effect while established
connections kept their VMs, and that refused files change nothing."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from control.api import unix as api
from control.config import Config, HealthConfig, validate
from control.deploy import GATEWAY_UNIT, unit_text
from testbed.addresses import VIP4
from testbed.config import ECHO_PORT, WEB_PORT
from testbed.config import testbed_config as make_config
from testbed.kit import GatewayDaemon, LineConn, poll_until, start_server, vm_binds, vm_health_binds
from testbed.topology import pin_dir, registry_path
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgr")
ETH_IP_UDP = 14 + 20 + 8
CONNS = 12
NEW_CONNS = 40


def variant(base: Config, *, web: tuple[str, ...] = ("vm1", "vm2"), weights: dict[str, int] | None = None,
            regions: int = 1, echo_health: HealthConfig | None = None, **gateway: object) -> Config:
    """The testbed config with web's VMs, VM weights, the first `regions` regions and echo's check set."""
    services = tuple(dataclasses.replace(s, vms=web) if s.name == "web" else
                     dataclasses.replace(s, health=echo_health) if s.name == "echo" else s for s in base.services)
    vms = tuple(dataclasses.replace(v, weight=(weights or {}).get(v.name, v.weight)) for v in base.vms)
    return validate(dataclasses.replace(base, services=services, vms=vms, regions=base.regions[:regions],
                                        gateway=dataclasses.replace(base.gateway, **gateway)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload")
    with running_testbed(PREFIX) as bed:
        tb = bed.tb
        base = make_config(PREFIX)
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds() + vm_health_binds(tb, vm.name))
        path = tmp / "gw1.toml"
        daemon = bed.launch(variant(base), path)
        yield {"tb": tb, "base": base, "path": path, "daemon": daemon, "sock": base.gateway.api_socket,
               "tmp": tmp, "bed": bed}


def reload_cli(env, path=None) -> subprocess.CompletedProcess:
    return subprocess.run([env["daemon"].xdpgw, "reload", "--config", str(path or env["path"])],
                          capture_output=True, text=True, timeout=60)


def snapshot(env) -> dict:
    """What a reload may change, without the times."""
    sock = env["sock"]
    keep = ("name", "id", "state", "weight", "port", "mac", "tunnel", "health")
    return {"vms": [{k: vm.get(k) for k in keep} for vm in api.call(sock, "vm.list")],
            "tables": api.call(sock, "maglev.tables"),
            "regions": sorted(api.call(sock, "stats")["regions"])}


def udp_to_echo(env, role: str, n: int = 5, size: int = 100) -> int:
    """`n` datagrams from a client to the echo VIP, each answered; the bytes the gateway saw."""
    tb = env["tb"]
    s = tb.socket(role, socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        s.bind((tb.client(role).ips[0], 0))
        for i in range(n):
            s.sendto(bytes([i]) * size, (VIP4, ECHO_PORT))
            assert s.recv(65535).endswith(bytes([i]) * size)
    finally:
        s.close()
    return n * (ETH_IP_UDP + size)


def test_reload_applies_weights_vms_regions_and_checks_keeping_connections(env):
    tb, sock = env["tb"], env["sock"]
    c1 = tb.client("c1")
    before = snapshot(env)
    assert set(before["tables"]["web"]["slots"]) == {"vm1", "vm2"} and "r2" not in before["regions"]
    conns = [LineConn(tb, "c1", c1.ips[0], VIP4, WEB_PORT) for _ in range(CONNS)]
    try:
        for i, conn in enumerate(conns):
            conn.ask(f"before {i}")
        assert {c.served_by for c in conns} == {"vm1", "vm2"}
        c2_before = api.call(sock, "stats")["regions"]["unknown"]["bytes"]
        sent = udp_to_echo(env, "c2")                  # r2 is not configured yet: counted as unknown
        assert api.call(sock, "stats")["regions"]["unknown"]["bytes"] - c2_before == sent

        check = HealthConfig(kind="udp", interval=0.3, timeout=0.3, rise=1, fall=2)
        env["path"].write_text(variant(env["base"], web=("vm1", "vm2", "vm3"), weights={"vm2": 3}, regions=2,
                                       echo_health=check).to_toml())
        r = reload_cli(env)
        assert r.returncode == 0, r.stderr
        assert "vms: changed vm2" in r.stdout and "regions: added r2" in r.stdout, r.stdout
        assert any("event=config.reloaded" in line and "regions_added=r2" in line
                   for line in env["daemon"].stderr), env["daemon"].stderr[-3:]

        # every established connection still answers, from the VM it had
        for i, conn in enumerate(conns):
            assert conn.ask(f"after {i}") == conn.served_by
        after = snapshot(env)
        ids = {vm["name"]: vm["id"] for vm in after["vms"]}
        assert ids == {vm["name"]: vm["id"] for vm in before["vms"]}     # unchanged names keep their ids
        assert next(vm for vm in after["vms"] if vm["name"] == "vm2")["weight"] == 3
        slots = after["tables"]["web"]["slots"]
        assert set(slots) == {"vm1", "vm2", "vm3"} and slots["vm2"] > 2 * slots["vm1"], slots
        assert after["tables"]["remote"] == before["tables"]["remote"]   # not touched: the same table

        # new connections reach the added VM; r2's traffic is counted under r2, exactly
        fresh = [LineConn(tb, "c1", c1.ips[0], VIP4, WEB_PORT) for _ in range(NEW_CONNS)]
        try:
            assert "vm3" in {c.ask("new") for c in fresh}
        finally:
            for c in fresh:
                c.close()
        r2_before = api.call(sock, "stats")["regions"]["r2"]["bytes"]
        sent = udp_to_echo(env, "c2")
        assert api.call(sock, "stats")["regions"]["r2"]["bytes"] - r2_before == sent

        # the new checks probe and decide
        healthy = poll_until(lambda: all(vm["health"] == "up" for vm in api.call(sock, "vm.list")
                                         if vm["name"] in ("vm1", "vm2", "vm3")), timeout=10)
        assert healthy, api.call(sock, "vm.list")
    finally:
        for c in conns:
            c.close()


def test_a_refused_file_changes_nothing(env):
    tb, daemon = env["tb"], env["daemon"]
    good = env["path"].read_text()
    before = snapshot(env)
    c1 = tb.client("c1")
    conn = LineConn(tb, "c1", c1.ips[0], VIP4, WEB_PORT)
    try:
        served = conn.ask("first")
        # syntax error: the CLI refuses it itself (exit 2, one line naming the place)
        env["path"].write_text(good + "\n[[vm]\n")
        r = reload_cli(env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "line" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        # the same by SIGHUP: the daemon logs one line and keeps running on the old config
        logged = len(daemon.stderr)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        refusal = poll_until(lambda: [line for line in daemon.stderr[logged:]
                                      if "event=config.reload_refused" in line], timeout=10)
        assert refusal and refusal[0].startswith(("level=error", "ts=")) and "line" in refusal[0], refusal
        assert not any("Traceback" in line for line in daemon.stderr[logged:])
        # a validation error (a service naming an unknown VM)
        env["path"].write_text(good.replace('vms = ["vm9"]', 'vms = ["vm9", "vm42"]'))
        r = reload_cli(env)
        assert r.returncode == 2 and "vm42" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # changes only a restart can make: the daemon refuses, naming the key
        for key, value in (("hash_seed", 7), ("flow_table_size", 131072)):
            changed = variant(env["base"], web=("vm1", "vm2", "vm3"), weights={"vm2": 3, "vm1": 2}, regions=2,
                              **{key: value})
            env["path"].write_text(changed.to_toml())
            r = reload_cli(env)
            assert r.returncode == 1 and f"gateway.{key}" in r.stderr and "restart" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        assert daemon.running
        after = snapshot(env)
        for vm_before, vm_after in zip(before["vms"], after["vms"]):
            assert {**vm_before, "health": None} == {**vm_after, "health": None}
        assert after["tables"] == before["tables"] and after["regions"] == before["regions"]
        assert conn.ask("still") == served
    finally:
        conn.close()
        env["path"].write_text(good)


def unit_capabilities() -> list[str]:
    """The CapabilityBoundingSet of the packaged gateway unit."""
    text = unit_text(GATEWAY_UNIT, "/bin/true")
    line = next(line for line in text.splitlines() if line.startswith("CapabilityBoundingSet="))
    return line.split("=", 1)[1].split()


def test_the_units_capabilities_are_enough(env, tmp_path):
    """The daemon with only the unit's capabilities (root's uid, bounding set cut
    as systemd does): it joins gateway.netns, loads, pins, attaches, runs the
    VM-port program's perf buffer, health checks, serves, reads its tables back,
    reloads, and the SIGUSR2 upgrade hands the attached program to the next run."""
    bed, tb = env["bed"], env["tb"]
    caps = unit_capabilities()
    assert caps == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"]
    wrapper = tmp_path / "xdpgw-capped"
    bounding = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --bounding-set={bounding} {env["daemon"].xdpgw} "$@"\n')
    wrapper.chmod(0o755)
    name = "gwc"
    check = HealthConfig(kind="udp", interval=0.3, timeout=0.3, rise=1, fall=2)
    gateway = dict(name=name, api_socket=f"/run/xdpgw/{PREFIX}-{name}.sock", pin_dir=pin_dir(PREFIX, name),
                   registry=registry_path(PREFIX, name), vm_ports=("gwv*",))
    config = variant(env["base"], web=("vm1", "vm2", "vm3"), regions=2, echo_health=check, **gateway)
    path = tmp_path / f"{name}.toml"
    path.write_text(config.to_toml())
    assert env["daemon"].stop() == 0          # one gateway on the uplink at a time
    sock = config.gateway.api_socket
    capped = GatewayDaemon(tb, str(path), xdpgw=str(wrapper))
    bed.daemons.append(capped)
    capped.start(timeout=60)
    conn = LineConn(tb, "c1", tb.client("c1").ips[0], VIP4, WEB_PORT)
    try:
        with open(f"/proc/{capped.proc.pid}/status") as f:
            bnd = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
        assert bin(bnd).count("1") == len(caps)
        served = conn.ask("capped")
        assert set(api.call(sock, "maglev.tables")["web"]["slots"]) == {"vm1", "vm2", "vm3"}
        watcher = api.call(sock, "migration.status")["watcher"]
        assert set(watcher["ports"]) == {"gwv1", "gwv2", "gwv3"} and not watcher["errors"], watcher
        assert poll_until(lambda: all(vm["health"] == "up" for vm in api.call(sock, "vm.list")
                                      if vm["name"] != "vm9"), timeout=10), api.call(sock, "vm.list")
        path.write_text(variant(env["base"], web=("vm1", "vm2"), regions=2, echo_health=check, **gateway).to_toml())
        r = subprocess.run([env["daemon"].xdpgw, "reload", "--config", str(path)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "services: changed web" in r.stdout, r.stdout + r.stderr
        assert set(api.call(sock, "maglev.tables")["web"]["slots"]) == {"vm1", "vm2"}
        # the upgrade path: SIGUSR2 leaves the program attached; the next run takes it over
        assert capped.stop(sig=signal.SIGUSR2) == 0
        assert any("xdp=attached" in line for line in capped.stderr)
        assert conn.ask("between runs") == served         # the attached program serves alone
        upgraded = GatewayDaemon(tb, str(path), xdpgw=str(wrapper))
        bed.daemons.append(upgraded)
        upgraded.start(timeout=60)
        assert conn.ask("next run") == served
        assert upgraded.stop() == 0
    finally:
        conn.close()


def test_run_under_ip_netns_exec_keeps_its_state_on_the_hosts_bpffs(env, tmp_path):
    """`ip netns exec <gw ns> xdpgw run` (no gateway.netns): it comes up, pins where a
    run from the host finds the state again, and stops cleanly."""
    bed, tb = env["bed"], env["tb"]
    name = "gwn"
    config = variant(env["base"], name=name, netns="", api_socket=f"/run/xdpgw/{PREFIX}-{name}.sock",
                     pin_dir=pin_dir(PREFIX, name), registry=registry_path(PREFIX, name))
    path = tmp_path / f"{name}.toml"
    path.write_text(config.to_toml())
    env["daemon"].stop()                      # one gateway on the uplink at a time
    inside = GatewayDaemon(tb, str(path), role="gw")
    bed.daemons.append(inside)
    inside.start(timeout=60)
    assert (Path(pin_dir(PREFIX, name)) / "state_ids").exists()
    conn = LineConn(tb, "c1", tb.client("c1").ips[0], VIP4, WEB_PORT)
    try:
        served = conn.ask("inside")
        ids = {vm["name"]: vm["id"] for vm in api.call(config.gateway.api_socket, "vm.list")}
        flows = api.call(config.gateway.api_socket, "stats")["flows"]["entries"]
        assert flows >= 1
        assert inside.stop() == 0
        assert any("event=gateway.stopped" in line for line in inside.stderr)
        # the next run, from the host with gateway.netns, finds the same pinned state
        path.write_text(dataclasses.replace(config, gateway=dataclasses.replace(
            config.gateway, netns=tb.ns("gw"))).to_toml())
        outside = bed.daemon(path)
        outside.start(timeout=60)
        assert {vm["name"]: vm["id"] for vm in api.call(config.gateway.api_socket, "vm.list")} == ids
        assert api.call(config.gateway.api_socket, "stats")["flows"]["entries"] >= flows
        assert conn.ask("outside") == served
        assert outside.stop() == 0
    finally:
        conn.close()
