"""control/runtime.py: services and VMs added at run time, validated as the file is
(errors located at the command's keys), merged with the file, kept in the store;
and control/rates.py IdleTracker (vm.list's idle_s)."""
from __future__ import annotations

from ipaddress import ip_address

import pytest

from control import runtime
from control.config import ConfigError, parse_config
from control.gateway import GatewayError, UnknownName
from control.rates import IdleTracker
from control.runtime import FileEntry, RuntimeAdditions
from control.store.sqlite import SqliteStore

FILE = """\
[gateway]
name = "gwrt"
interface = "eth9"
tunnel_source = "198.18.0.2"

[[service]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
vms = ["vm1", "vm2"]

[[vm]]
name = "vm1"
port = "tap1"
mac = "02:00:00:00:00:01"
ip = "198.18.10.1"

[[vm]]
name = "vm2"
port = "tap2"
mac = "02:00:00:00:00:02"
"""

SOURCE = "/etc/xdpgw/gwrt.toml"
DV1 = {"name": "dv1", "port": "tap3", "mac": "02:00:00:00:00:03", "ips": ["198.18.10.3", "2001:db8::3"]}
ECHO = {"name": "echo", "vip": "198.18.100.2", "port": 53, "protocol": "udp", "vms": ["vm2", "dv1"]}


@pytest.fixture
def file():
    return parse_config(FILE, SOURCE)


def apply(file, tables, command, args):
    """The additions after `command` and the config they make (as the daemon runs them)."""
    tables, name = runtime.changed(tables, file, command, args)
    return tables, runtime.merged(file, tables, command=command, subject=name)


def error(file, tables, command, args) -> str:
    with pytest.raises(ConfigError) as e:
        apply(file, tables, command, args)
    return str(e.value)


def test_added_vm_and_service_follow_the_files_entries(file):
    tables, config = apply(file, runtime.empty(), "vm.add", {**DV1, "services": ["web"], "weight": 3})
    tables, config = apply(file, tables, "service.add", ECHO)
    assert [v.name for v in config.vms] == ["vm1", "vm2", "dv1"]
    assert config.vm("dv1").ips == (ip_address("198.18.10.3"), ip_address("2001:db8::3"))
    assert config.vm("dv1").weight == 3
    assert config.service("web").vms == ("vm1", "vm2", "dv1")          # joined a service of the file
    assert config.service("echo").vms == ("vm2", "dv1") and config.service("echo").protocol == "udp"
    assert tables == {"vm": {"dv1": {**DV1, "services": ["web"], "weight": 3}}, "service": {"echo": ECHO}}


def test_errors_name_the_commands_key_like_the_files(file):
    empty = runtime.empty()
    assert error(file, empty, "vm.add", {**DV1, "mac": "zz"}) == \
        "vm.add: mac: \"zz\" is not a MAC address (six hex octets separated by ':')"
    assert error(file, empty, "vm.add", {**DV1, "mac": "02:00:00:00:00:01"}) == \
        'vm.add: mac: 02:00:00:00:00:01 is also the MAC of vm[0] "vm1"'
    assert error(file, empty, "vm.add", {**DV1, "name": "vm1"}) == 'vm.add: name: duplicate vm name "vm1" (also vm[0])'
    assert error(file, empty, "vm.add", {**DV1, "colour": "red"}) == "vm.add: colour: unknown key"
    assert error(file, empty, "vm.add", {**DV1, "ips": ["198.18.10.1"]}) == \
        'vm.add: ips[0]: 198.18.10.1 is also an address of vm[0] "vm1"'
    assert error(file, empty, "vm.add", {**DV1, "services": ["web", "nope"]}) == \
        'vm.add: services[1]: unknown service "nope"'
    assert error(file, empty, "vm.add", {**DV1, "tunnel": "198.18.0.9"}) == \
        'vm.add: has both port and tunnel; set exactly one'
    assert error(file, empty, "vm.add", {"port": "tap3"}) == "vm.add: name: missing required key"
    assert error(file, empty, "service.add", {**ECHO, "vms": ["vm2", "ghost"]}) == \
        'service.add: vms: unknown VM "ghost"'
    assert error(file, empty, "service.add", {**ECHO, "port": 80, "protocol": "tcp", "vip": "198.18.100.1"}) == \
        'service.add: same vip, port and protocol (198.18.100.1, 80, tcp) as service[0] "web"'
    assert error(file, empty, "service.add", {**ECHO, "vms": ["vm2"], "protocol": "sctp"}) == \
        'service.add: protocol: "sctp" is not one of tcp, udp'
    assert error(file, empty, "service.add", {**ECHO, "vms": ["vm2"], "health": {"kind": "udp", "rise": 0}}) == \
        "service.add: health.rise: 0 is out of range 1..100"
    assert error(file, empty, "service.add", {**ECHO, "vms": ["vm2"], "health": {"kind": "udp"}}) == \
        'service.add: vm[1] "vm2".ips: no IPv4 address; the health check of runtime service "echo" ' \
        '(VIP 198.18.100.2) probes the VM at one'
    _, config = apply(file, empty, "service.add", {**ECHO, "vms": ["vm1"], "health": {"kind": "udp"}})
    assert config.service("echo").health.kind == "udp"


def test_an_error_about_another_addition_names_it(file):
    tables, _ = apply(file, runtime.empty(), "vm.add", DV1)
    assert error(file, tables, "vm.add", {"name": "dv2", "port": "tap4", "mac": DV1["mac"]}) == \
        'vm.add: mac: 02:00:00:00:00:03 is also the MAC of runtime vm "dv1"'
    # the gateway's own checks (ports, capacity) name entries by place: located the same way
    locate = runtime.locate_errors(file, tables, None, "vm.add", "dv1")
    assert str(locate(ConfigError("vm[2].port", "VM 'dv1': no interface tap3"))) == \
        "vm.add: port: VM 'dv1': no interface tap3"


def test_removal(file):
    tables, _ = apply(file, runtime.empty(), "vm.add", {**DV1, "services": ["web"]})
    tables, _ = apply(file, tables, "service.add", ECHO)
    tables, _ = apply(file, tables, "vm.add", {"name": "dv2", "tunnel": "198.18.0.9", "services": ["echo"]})
    # a VM leaves every service; the last VM of a service is not removed from under it
    after, config = apply(file, tables, "vm.remove", {"name": "dv1"})
    assert config.service("web").vms == ("vm1", "vm2") and config.service("echo").vms == ("vm2", "dv2")
    only = {**tables, "service": {"echo": {**ECHO, "vms": ["dv1"]}}}
    assert error(file, only, "vm.remove", {"name": "dv1"}) == \
        'vm.remove: name: VM "dv1" is the only VM of service "echo" (added at run time); remove the service ' \
        'first (service.remove)'
    # a service's removal takes it out of the VMs that joined it
    after, config = apply(file, tables, "service.remove", {"name": "echo"})
    assert after["vm"]["dv2"]["services"] == [] and [s.name for s in config.services] == ["web"]
    with pytest.raises(FileEntry, match=r'^vm.remove: vm "vm1" is defined in the config file; remove it there '
                                        r'and reload \(xdpgw reload\)$'):
        runtime.changed(tables, file, "vm.remove", {"name": "vm1"})
    with pytest.raises(UnknownName, match=r'^service.remove: unknown service "nope" \(not added at run time\)$'):
        runtime.changed(tables, file, "service.remove", {"name": "nope"})


def test_adding_again_is_a_no_op_but_not_with_other_keys(file):
    tables, _ = apply(file, runtime.empty(), "vm.add", DV1)
    assert runtime.changed(tables, file, "vm.add", {**DV1, "tenant": None})[0] == tables   # null: absent
    assert error(file, tables, "vm.add", {**DV1, "weight": 2}) == \
        'vm.add: name: vm "dv1" was added at run time with other keys; remove it first (vm.remove)'


def test_the_file_and_the_additions_may_not_share_a_name(file):
    tables, _ = apply(file, runtime.empty(), "vm.add", DV1)
    grown = parse_config(FILE + '\n[[vm]]\nname = "dv1"\ntunnel = "198.18.0.7"\n', SOURCE)
    with pytest.raises(ConfigError) as e:
        runtime.merged(grown, tables, source=SOURCE)
    assert str(e.value) == f'{SOURCE}: vm[2].name: "dv1" is also the name of a vm added at run time; rename one, ' \
                           'or remove the run-time one (xdpgw vm remove dv1) first'
    # ... but the run-time one can be removed (also while the file defines the name)
    assert runtime.changed(tables, grown, "vm.remove", {"name": "dv1"})[0] == runtime.empty()
    # a file that drops a VM an addition names: the error names the addition
    tables, _ = apply(file, tables, "service.add", ECHO)
    shrunk = parse_config(FILE.replace('"vm1", "vm2"', '"vm1"').split('[[vm]]\nname = "vm2"')[0], SOURCE)
    with pytest.raises(ConfigError) as e:
        runtime.merged(shrunk, tables, source=SOURCE)
    assert str(e.value) == f'{SOURCE}: runtime service "echo".vms: unknown VM "vm2"'


def test_kept_in_the_store_as_one_value(file, tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    try:
        kept = RuntimeAdditions(store, "gwrt")
        assert kept.load() == runtime.empty()
        tables, _ = apply(file, kept.tables, "vm.add", {**DV1, "services": ["web"]})
        kept.save(tables)
        again = RuntimeAdditions(store, "gwrt")
        assert again.load() == tables
        assert RuntimeAdditions(store, "other").load() == runtime.empty()       # keys of this gateway only
        assert runtime.merged(file, again.tables, source=SOURCE).service("web").vms == ("vm1", "vm2", "dv1")
        # a writer that read before another's write loses, and changes nothing
        again.save(runtime.empty())
        with pytest.raises(GatewayError, match="changed by another process"):
            kept.save(tables)
        assert RuntimeAdditions(store, "gwrt").load() == runtime.empty()
    finally:
        store.close()


def test_idle_since_the_packet_count_last_grew():
    idle = IdleTracker("vms")
    idle.sample({"vms": {"a": {"packets": 0}, "b": {"packets": 7}}}, now=10.0)
    assert idle.idle_s("a", now=12.0) is None                 # never had a packet
    assert idle.idle_s("b", now=12.0) == 2.0                  # had some when first seen
    idle.sample({"vms": {"a": {"packets": 3}, "b": {"packets": 7}}}, now=11.0)
    assert idle.idle_s("a", now=12.5) == 1.5 and idle.idle_s("b", now=12.5) == 2.5
    idle.sample({"vms": {"a": {"packets": 3}}}, now=12.0)     # b removed: forgotten
    assert idle.idle_s("b", now=13.0) is None and idle.idle_s("a", now=13.0) == 2.0
    idle.sample({"vms": {"a": {"packets": 0}}}, now=14.0)     # reset to zero: no packet
    assert idle.idle_s("a", now=15.0) == 4.0
