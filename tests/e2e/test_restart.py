"""Restart without loss (issue 4.2): pinned flows, counters, ids and offloads
survive `xdpgw run` restarts; the upgrade path (SIGUSR2) never leaves the
interface without a program; a layout change is refused unless --reset."""
from __future__ import annotations

import dataclasses
import signal
import subprocess

import pytest

from control.api import unix as api
from control.config import validate
from testbed.kit import GatewayDaemon, LineConn, dc2_binds, start_server, vm_binds
from testbed.config import WEB_PORT
from testbed.config import testbed_config as make_config
from dataplane.pinning import PIN_ROOT, LayoutError, PinnedState, mount_type
from dataplane.program import Sizes, attached_program_id
from testbed.addresses import DC2_ENDPOINT, UPLINK, VIP4
from testbed.topology import Testbed
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgr")


# ------------------------------------------------------------ pinned ids, layout

@pytest.fixture
def pins():
    state = PinnedState(PIN_ROOT / f"{PREFIX}-unit")
    yield state
    state.reset()
    assert not state.dir.exists()


def test_ids_are_kept_and_new_names_never_take_a_departed_id(pins):
    pins.open()
    ids, new = pins.assign_ids("vm", ["a", "b", "c"], 1, 10)
    assert ids == {"a": 1, "b": 2, "c": 3} and new == {"a", "b", "c"}
    pins.close()
    pins.open()                                   # a restart: the map is reopened from bpffs
    ids, new = pins.assign_ids("vm", ["c", "a", "d"], 1, 10)   # b left, d arrived, order changed
    assert ids == {"c": 3, "a": 1, "d": 4} and new == {"d"}
    ids, new = pins.assign_ids("vm", ["c", "a", "d", "b"], 1, 10)
    assert ids["b"] == 5 and new == {"b"}         # b's old id 2 is not handed out again yet
    regions, _ = pins.assign_ids("region", ["r1"], 1, 10)
    assert regions == {"r1": 1}                   # kinds have their own id spaces


def test_ids_are_reused_only_when_the_range_is_spent(pins):
    pins.open()
    pins.assign_ids("vm", ["a", "b", "c"], 1, 3)
    ids, _ = pins.assign_ids("vm", ["a", "d"], 1, 3)
    assert ids == {"a": 1, "d": 2}
    with pytest.raises(LayoutError, match="no free vm id in 1..3 for 'f'"):   # e takes 3, the last free id
        pins.assign_ids("vm", ["a", "d", "e", "f", "g"], 1, 3)


def test_layout_change_is_refused(pins):
    pins.open()
    pins.check_layout(Sizes(flow_entries=4096))
    pins.check_layout(Sizes(flow_entries=4096, maglev_m=251))   # M is not in a pinned map's layout
    with pytest.raises(LayoutError, match="another map layout.*--reset"):
        pins.check_layout(Sizes(flow_entries=8192))


def test_pins_need_a_bpf_filesystem(tmp_path):
    assert mount_type(PIN_ROOT) == "bpf"
    with pytest.raises(LayoutError, match="not on a BPF filesystem.*gateway.netns"):
        PinnedState(tmp_path / "pins").open()


# ------------------------------------------------------------ the real daemon

@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with running_testbed(PREFIX) as env:
        tb = env.tb
        for vm in tb.vms:
            start_server(tb, vm.name, vm.name, vm_binds())
        start_server(tb, "dc2", "dc2", dc2_binds())
        yield tb, tmp_path_factory.mktemp("restart")
    assert not list(PIN_ROOT.glob(f"{PREFIX}-*")), "the testbed left pinned state behind"


def _conns(tb: Testbed, n: int) -> list[LineConn]:
    conns = [LineConn(tb, "c1", tb.client("c1").ips[i % 2], VIP4, WEB_PORT, timeout=10) for i in range(n)]
    for c in conns:
        c.ask("hello")
    return conns


def _all_answer_from_their_vm(conns: list[LineConn], text: str) -> None:
    for c in conns:
        assert c.ask(text) == c.served_by, f"{c!r} moved"


def test_connections_and_counters_survive_restarts(bed):
    tb, tmp = bed
    config = make_config(PREFIX)
    path = tmp / "gw.toml"
    daemon = GatewayDaemon.launch(tb, config, path)
    sock = config.gateway.api_socket
    conns = _conns(tb, 8)
    assert len({c.served_by for c in conns}) > 1
    api.call(sock, "offload.set", region="r2", service="web", endpoint=DC2_ENDPOINT)
    before = api.call(sock, "stats")
    prog = tb.run("gw", attached_program_id, UPLINK)
    try:
        # upgrade path: the old program keeps serving while no daemon runs
        assert daemon.stop(sig=signal.SIGUSR2) == 0
        assert tb.run("gw", attached_program_id, UPLINK) == prog
        _all_answer_from_their_vm(conns, "between daemons")
        daemon = GatewayDaemon.launch(tb, config, path)
        assert tb.run("gw", attached_program_id, UPLINK) not in (None, prog)   # replaced in one step
        _all_answer_from_their_vm(conns, "after upgrade")

        # a full stop detaches; the connections wait (TCP retransmits) and come back to their VMs
        assert daemon.stop() == 0
        assert tb.run("gw", attached_program_id, UPLINK) is None
        # Restart with the VMs listed in another order (ids, and so flows, follow names)
        # and with web served only by vm9 in the remote DC: Maglev would now send every
        # flow there, so only the pinned flow table keeps the connections on their VMs.
        web = dataclasses.replace(config.service("web"), vms=("vm9",))
        changed = validate(dataclasses.replace(
            config, vms=tuple(reversed(config.vms)),
            services=tuple(web if s.name == "web" else s for s in config.services)))
        daemon = GatewayDaemon.launch(tb, changed, path)
        _all_answer_from_their_vm(conns, "after restart")
        fresh = LineConn(tb, "c1", tb.client("c1").ip, VIP4, WEB_PORT, timeout=10)
        conns.append(fresh)
        assert fresh.ask("new") == "dc2"

        after = api.call(sock, "stats")
        for section in ("regions", "services", "vms"):
            for name, c in before[section].items():
                assert after[section][name]["packets"] >= c["packets"] + (0 if c["packets"] == 0 else 1), \
                    f"{section} {name} counters were reset"
        assert after["regions"]["r1"]["packets"] >= before["regions"]["r1"]["packets"] + 8 * 4
        assert after["flows"]["entries"] >= 8
        assert api.call(sock, "offload.list") == [{"region": "r2", "service": "web", "endpoint": DC2_ENDPOINT, "encap": "ipip"}]
        for c in conns[:-1]:
            assert api.call(sock, "flow.lookup", service="web", src=c.src, sport=c.sport)["reason"] == "flow table"
    finally:
        for c in conns:
            c.close()
        daemon.stop()


def test_layout_change_is_refused_and_reset_starts_over(bed):
    tb, tmp = bed
    config = make_config(PREFIX, name="gwl")
    path = tmp / "gwl.toml"
    daemon = GatewayDaemon.launch(tb, config, path)
    assert daemon.stop() == 0
    bigger = make_config(PREFIX, name="gwl", flow_table_size=2 * config.gateway.flow_table_size)
    path.write_text(bigger.to_toml())
    xdpgw = GatewayDaemon(tb, str(path)).xdpgw
    r = subprocess.run([xdpgw, "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "another map layout" in lines[0] and "--reset" in lines[0]
    assert tb.run("gw", attached_program_id, UPLINK) is None        # nothing attached
    r = subprocess.run([xdpgw, "reset", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "removed" in r.stdout
    daemon = GatewayDaemon.launch(tb, bigger, path)
    assert daemon.stop() == 0
