"""Services and VMs added to a running daemon (`service.add`, `vm.add`, the CLI's
`xdpgw service|vm add|remove`), with real UDP flows in the namespace testbed: the
daemon starts from a file with one service on vm1 and vm2; vm3 and the echo
service (on vm2 and vm3) are added at run time, their flows reach them, a
restart keeps them, a file that claims an added name is refused, and removing
vm3, then echo, stops new flows to them. vm.list's packets match what the VMs
answered; idle_s follows the sampler's ticks."""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from collections import Counter

from control.api import unix as api
from control.config import validate
from testbed.addresses import VIP4
from testbed.config import ECHO_PORT
from testbed.config import testbed_config as make_config
from testbed.kit import poll_until, start_server, vm_binds
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgq")
FLOWS = 40
TICK_S = 0.2          # gateway.stats_interval: idle_s's resolution


def echo_flows(tb, n: int = FLOWS, timeout: float = 2.0) -> Counter:
    """`n` UDP flows (one datagram each, each from its own port) from c1 to the echo
    VIP: how many each VM answered ("-" for no answer)."""
    served: Counter = Counter()
    for i in range(n):
        s = tb.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.bind((tb.client("c1").ips[0], 0))
            s.sendto(b"flow %d" % i, (VIP4, ECHO_PORT))
            try:
                name, _, rest = s.recv(65535).partition(b":")
                assert rest == b"flow %d" % i
                served[name.decode()] += 1
            except socket.timeout:
                served["-"] += 1
        finally:
            s.close()
    return served


def cli(daemon, path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([daemon.xdpgw, *argv, "--config", str(path)], capture_output=True, text=True, timeout=60)


def vms(sock: str) -> dict[str, dict]:
    return {vm["name"]: vm for vm in api.call(sock, "vm.list")}


def test_services_and_vms_added_at_run_time(tmp_path):
    with running_testbed(PREFIX) as bed:
        tb = bed.tb
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        base = make_config(PREFIX, stats_interval=TICK_S)
        file = validate(dataclasses.replace(
            base, vms=tuple(v for v in base.vms if v.name in ("vm1", "vm2")),
            services=tuple(dataclasses.replace(s, vms=("vm1", "vm2")) for s in base.services if s.name == "web")))
        path = tmp_path / "gw1.toml"
        daemon = bed.launch(file, path)
        sock = base.gateway.api_socket
        assert echo_flows(tb, 3, timeout=0.5) == Counter({"-": 3})        # no echo service yet

        vm3 = tb.vm("vm3")
        r = cli(daemon, path, "vm", "add", "vm3", "--port", vm3.port, "--mac", vm3.mac, "--ip", vm3.ip)
        assert r.returncode == 0 and "vms: added vm3" in r.stdout, r.stdout + r.stderr
        r = cli(daemon, path, "service", "add", "echo", "--vip", VIP4, "--port", str(ECHO_PORT), "--protocol", "udp",
                "--vm", "vm2", "--vm", "vm3")
        assert r.returncode == 0 and "services: added echo" in r.stdout, r.stdout + r.stderr
        # a refused change: one line naming the key, nothing changed
        r = cli(daemon, path, "vm", "add", "vm4", "--port", vm3.port, "--mac", vm3.mac)
        assert r.returncode == 1 and r.stderr.strip() == \
            f'xdpgw: vm.add: mac: {vm3.mac} is also the MAC of runtime vm "vm3"', r.stderr
        assert set(api.call(sock, "maglev.tables")["echo"]["slots"]) == {"vm2", "vm3"}

        t_sent = time.monotonic()
        served = echo_flows(tb)
        assert set(served) == {"vm2", "vm3"}, served
        listed = vms(sock)
        assert {n: listed[n]["packets"] for n in ("vm1", "vm2", "vm3")} == \
            {"vm1": 0, "vm2": served["vm2"], "vm3": served["vm3"]}
        assert poll_until(lambda: vms(sock)["vm3"]["idle_s"] is not None, timeout=5)
        time.sleep(1.0)
        listed = vms(sock)
        assert listed["vm1"]["idle_s"] is None                             # never had a packet
        assert 1.0 - TICK_S <= listed["vm3"]["idle_s"] <= time.monotonic() - t_sent + TICK_S, listed["vm3"]

        # a restart keeps the additions, their ids and (pinned) counters
        ids = {n: vm["id"] for n, vm in listed.items()}
        assert daemon.stop() == 0
        daemon = bed.daemon(path)
        daemon.start(timeout=60)
        listed = vms(sock)
        assert {n: vm["id"] for n, vm in listed.items()} == ids
        assert listed["vm3"]["packets"] == served["vm3"]
        again = echo_flows(tb)
        assert set(again) == {"vm2", "vm3"}, again
        assert vms(sock)["vm3"]["packets"] == served["vm3"] + again["vm3"]

        # a file that defines an added name is refused, naming both
        good = path.read_text()
        path.write_text(validate(dataclasses.replace(file, vms=(*file.vms, base.vm("vm3")))).to_toml())
        r = cli(daemon, path, "reload")
        assert r.returncode == 1 and r.stderr.strip() == \
            f'xdpgw: {path}: vm[2].name: "vm3" is also the name of a vm added at run time; rename one, or remove ' \
            'the run-time one (xdpgw vm remove vm3) first', r.stderr
        path.write_text(good)
        assert "echo" in api.call(sock, "maglev.tables")

        # removing vm3: it leaves echo, new flows go to vm2 only
        r = cli(daemon, path, "vm", "remove", "vm3")
        assert r.returncode == 0 and "vms: removed vm3" in r.stdout and "services: changed echo" in r.stdout, r.stdout
        assert set(api.call(sock, "maglev.tables")["echo"]["slots"]) == {"vm2"}
        assert echo_flows(tb) == Counter({"vm2": FLOWS})
        # a VM of the file is the file's business
        r = cli(daemon, path, "vm", "remove", "vm1")
        assert r.returncode == 1 and "defined in the config file" in r.stderr, r.stderr
        # removing echo: its flows stop; and it stays removed over a reload of the file
        r = cli(daemon, path, "service", "remove", "echo")
        assert r.returncode == 0 and "services: removed echo" in r.stdout, r.stdout
        assert cli(daemon, path, "reload").returncode == 0
        assert echo_flows(tb, 3, timeout=0.5) == Counter({"-": 3})
        assert set(vms(sock)) == {"vm1", "vm2"} and set(api.call(sock, "maglev.tables")) == {"web"}
