"""control/config/: parsing, defaults, round trip, and one error per rule."""

import dataclasses
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.config import (
    Config,
    ConfigError,
    GatewayConfig,
    RegionConfig,
    ServiceConfig,
    VMConfig,
    load_config,
    parse_config,
    validate,
)

FULL = """\
[gateway]
name = "gw1"
interface = "eth1"
xdp_mode = "native"
tunnel_source = "198.18.0.2"
tunnel_source6 = "2001:db8::2"
next_hop_mac = "02:00:00:00:02:01"
api_socket = "/run/xdpgw/test.sock"
flow_table_size = 4096
maglev_table_size = 251
hash_seed = 42
max_services = 4
max_vms = 8
max_regions = 4
stats_interval = 0.5

[[region]]
name = "r1"
prefixes = ["198.18.1.0/24", "2001:db8:1::/48"]

[[region]]
name = "r2"
prefixes = ["198.18.2.0/24"]

[[service]]
name = "web"
vip = "198.19.0.10"
port = 8080
protocol = "tcp"
vms = ["vm1", "vm2"]

[[service]]
name = "dns"
vip = "2001:db8:f::53"
port = 53
protocol = "udp"
vms = ["vm2", "vm9", "vm6"]

[[vm]]
name = "vm1"
port = "gw-vm1"
mac = "02:00:00:00:00:01"
ip = "198.18.101.2"
weight = 2

[[vm]]
name = "vm2"
port = "gw-vm2"
mac = "02:00:00:00:00:0A"
ips = ["198.18.102.2", "2001:db8:101::2"]

[[vm]]
name = "vm9"
tunnel = "198.18.200.2"

[[vm]]
name = "vm6"
tunnel = "2001:db8:200::2"
weight = 0
"""

MINIMAL = """\
[gateway]
name = "gw1"
interface = "eth1"
"""


def edit(old: str, new: str, text: str = FULL) -> str:
    """`text` with the one occurrence of `old` replaced (so each case edits what it means to)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


# ---------------------------------------------------------------- valid configs


def test_full_config_values() -> None:
    c = parse_config(FULL)
    assert c.gateway == GatewayConfig(
        name="gw1",
        interface="eth1",
        xdp_mode="native",
        tunnel_source=IPv4Address("198.18.0.2"),
        tunnel_source6=IPv6Address("2001:db8::2"),
        next_hop_mac="02:00:00:00:02:01",
        api_socket="/run/xdpgw/test.sock",
        flow_table_size=4096,
        maglev_table_size=251,
        hash_seed=42,
        max_services=4,
        max_vms=8,
        max_regions=4,
        stats_interval=0.5,
    )
    assert c.regions == (
        RegionConfig("r1", (ip_network("198.18.1.0/24"), ip_network("2001:db8:1::/48"))),
        RegionConfig("r2", (ip_network("198.18.2.0/24"),)),
    )
    assert c.services == (
        ServiceConfig("web", ip_address("198.19.0.10"), 8080, "tcp", ("vm1", "vm2")),
        ServiceConfig("dns", ip_address("2001:db8:f::53"), 53, "udp", ("vm2", "vm9", "vm6")),
    )
    assert c.vms == (
        VMConfig("vm1", port="gw-vm1", mac="02:00:00:00:00:01", ips=(ip_address("198.18.101.2"),), weight=2),
        VMConfig("vm2", port="gw-vm2", mac="02:00:00:00:00:0a",
                 ips=(ip_address("198.18.102.2"), ip_address("2001:db8:101::2"))),
        VMConfig("vm9", tunnel=ip_address("198.18.200.2")),
        VMConfig("vm6", tunnel=ip_address("2001:db8:200::2"), weight=0),
    )


def test_lookups_and_ids() -> None:
    c = parse_config(FULL)
    assert c.vm("vm9").tunnel == IPv4Address("198.18.200.2")
    assert c.service("dns").port == 53
    assert c.region("r2").prefixes == (ip_network("198.18.2.0/24"),)
    for lookup in (c.vm, c.service, c.region):
        with pytest.raises(KeyError):
            lookup("nope")
    assert c.region_ids() == {"r1": 1, "r2": 2}  # 0 is "unknown region"
    assert c.service_ids() == {"web": 0, "dns": 1}
    assert c.vm_ids() == {"vm1": 1, "vm2": 2, "vm9": 3, "vm6": 4}


def test_defaults() -> None:
    c = parse_config(MINIMAL)
    assert c == Config(GatewayConfig("gw1", "eth1"))
    g = c.gateway
    assert (g.xdp_mode, g.tunnel_source, g.tunnel_source6, g.next_hop_mac) == ("auto", None, None, None)
    assert g.api_socket == "/run/xdpgw/gw1.sock"
    assert (g.flow_table_size, g.maglev_table_size, g.hash_seed) == (65536, 65537, 0)
    assert (g.max_services, g.max_vms, g.max_regions, g.stats_interval) == (64, 1024, 256, 1.0)
    assert (c.regions, c.services, c.vms) == ((), (), ())
    vm = parse_config(MINIMAL + '[[vm]]\nname = "a"\nport = "p"\nmac = "02:00:00:00:00:01"\n').vm("a")
    assert (vm.ips, vm.tunnel, vm.weight) == ((), None, 1)


def test_vm_addresses_and_the_ip_shorthand() -> None:
    c = parse_config(FULL)
    vm2 = c.vm("vm2")
    assert (vm2.address(4), vm2.address(6)) == (ip_address("198.18.102.2"), ip_address("2001:db8:101::2"))
    assert (c.vm("vm1").address(6), c.vm("vm9").address(4)) == (None, None)
    # `ip = A` is `ips = [A]`; the config is written back with ips only
    assert parse_config(edit('ip = "198.18.101.2"', 'ips = ["198.18.101.2"]')) == c
    toml = c.to_toml()
    assert 'ips = ["198.18.101.2"]' in toml and "\nip = " not in toml
    assert parse_config(edit('ips = ["198.18.102.2", "2001:db8:101::2"]', "ips = []")).vm("vm2").ips == ()


def test_integer_stats_interval_becomes_float() -> None:
    g = parse_config(MINIMAL + "stats_interval = 2\n").gateway
    assert g.stats_interval == 2.0 and isinstance(g.stats_interval, float)


def test_round_trip() -> None:
    c = parse_config(FULL)
    assert parse_config(c.to_toml()) == c
    minimal = parse_config(MINIMAL)
    assert parse_config(minimal.to_toml()) == minimal


def test_direct_construction_validates_and_normalizes() -> None:
    built = Config(
        GatewayConfig("gw2", "veth0", tunnel_source=IPv4Address("198.18.0.1")),
        regions=[RegionConfig("r", [ip_network("198.18.0.0/15")])],  # lists are accepted
        services=[ServiceConfig("s", ip_address("198.19.0.1"), 80, "tcp", ["a", "b"])],
        vms=[VMConfig("a", port="p0", mac="02:AB:00:00:00:01"), VMConfig("b", tunnel=IPv4Address("198.18.9.9"))],
    )
    c = validate(built)
    assert c.vm("a").mac == "02:ab:00:00:00:01"
    assert c.services[0].vms == ("a", "b") and isinstance(c.regions, tuple)
    assert validate(c) == c
    assert parse_config(c.to_toml()) == c
    hash(c)  # frozen all the way down


def test_load_config_file(tmp_path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(FULL)
    assert load_config(path) == parse_config(FULL)
    assert load_config(str(path)) == parse_config(FULL)


def test_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(edit("port = 8080", 'port = "8080"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f'{path}: service[0].port: expected an integer, got string "8080"'

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert str(info.value) == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"

    path.write_bytes(b'[gateway]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 (byte 18)"

    with pytest.raises(ConfigError) as info:
        parse_config("[gateway\n", source="x.toml")
    assert str(info.value).startswith("x.toml: line 1, column 9: ")


@pytest.mark.parametrize(
    "text, where",
    [
        (edit("port = 8080\n", "port = \n"), f"line {FULL.splitlines().index('port = 8080') + 1}, column 8"),
        ("[gateway]\n[gateway]\n", "line 2, column 9"),
        (FULL + "[[vm]\n", f"line {FULL.count(chr(10)) + 1}, column 5"),
        (FULL + "x = [1,\n", "end of document"),
    ],
)
def test_toml_syntax_error(text: str, where: str) -> None:
    # The location is tomllib's; its wording of the problem may change between Pythons.
    message = error_of(text)
    assert message.startswith(f"{where}: ") and len(message) > len(where) + 2
    assert len(message.splitlines()) == 1


# ---------------------------------------------------------------- one error per rule

ERRORS = [
    # unknown keys, at every level
    (edit('interface = "eth1"', 'interfac = "eth1"'), "gateway.interfac: unknown key"),
    (edit('protocol = "udp"', 'protcol = "udp"'), "service[1].protcol: unknown key"),
    (edit('name = "r2"', 'name = "r2"\ncolour = "red"'), "region[1].colour: unknown key"),
    (edit("weight = 2", "wieght = 2"), "vm[0].wieght: unknown key"),
    (edit("weight = 2", '"a b" = 2'), 'vm[0]."a b": unknown key'),
    ('colour = "red"\n' + FULL, "colour: unknown key"),
    (edit("[[service]]\nname = \"web\"", "[[servic]]\nname = \"web\""), "servic: unknown key"),
    # missing required keys and tables
    (edit('interface = "eth1"\n', ""), "gateway.interface: missing required key"),
    (edit('[gateway]\nname = "gw1"\n', "[gateway]\n"), "gateway.name: missing required key"),
    (edit("port = 8080\n", ""), "service[0].port: missing required key"),
    (edit('protocol = "tcp"\n', ""), "service[0].protocol: missing required key"),
    (edit('vms = ["vm1", "vm2"]\n', ""), "service[0].vms: missing required key"),
    (edit('prefixes = ["198.18.2.0/24"]\n', ""), "region[1].prefixes: missing required key"),
    (edit('[[vm]]\nname = "vm9"', "[[vm]]"), "vm[2].name: missing required key"),
    (MINIMAL.replace("[gateway]", "[gw]"), "gw: unknown key"),
    ("", "gateway: missing required table [gateway]"),
    # wrong types
    (edit("port = 8080", 'port = "8080"'), 'service[0].port: expected an integer, got string "8080"'),
    (edit("port = 8080", "port = true"), "service[0].port: expected an integer, got boolean true"),
    (edit("weight = 2", "weight = 1.5"), "vm[0].weight: expected an integer, got float 1.5"),
    (edit("hash_seed = 42", "hash_seed = false"), "gateway.hash_seed: expected an integer, got boolean false"),
    (edit('name = "vm1"', "name = 1"), "vm[0].name: expected a string, got integer 1"),
    (edit('port = "gw-vm1"', "port = 1"), "vm[0].port: expected a string, got integer 1"),
    (edit('xdp_mode = "native"', "xdp_mode = []"), "gateway.xdp_mode: expected a string, got array"),
    (edit('vms = ["vm1", "vm2"]', 'vms = "vm1"'), 'service[0].vms: expected an array, got string "vm1"'),
    (edit('vms = ["vm1", "vm2"]', 'vms = ["vm1", 2]'), "service[0].vms[1]: expected a string, got integer 2"),
    (edit('vip = "198.19.0.10"', "vip = 3323134986"),
     "service[0].vip: expected an IP address string, got integer 3323134986"),
    (edit('prefixes = ["198.18.2.0/24"]', "prefixes = [5]"),
     "region[1].prefixes[0]: expected a CIDR prefix string, got integer 5"),
    (edit('prefixes = ["198.18.2.0/24"]', 'prefixes = "198.18.2.0/24"'),
     'region[1].prefixes: expected an array, got string "198.18.2.0/24"'),
    (edit("stats_interval = 0.5", "stats_interval = true"),
     "gateway.stats_interval: expected a number of seconds, got boolean true"),
    (edit("stats_interval = 0.5", "stats_interval = 1979-05-27"),
     "gateway.stats_interval: expected a number of seconds, got date"),
    (edit('mac = "02:00:00:00:00:01"', "mac = 2"), "vm[0].mac: expected a string, got integer 2"),
    (MINIMAL.replace("[gateway]", "[[gateway]]"), "gateway: expected a table, got array"),
    (MINIMAL + '[region]\nname = "r"\n', "region: expected an array of tables ([[region]]), got table"),
    (MINIMAL + "vm = 1\n", "gateway.vm: unknown key"),
    # value checks: gateway
    (edit('name = "gw1"', 'name = "GW1"'), 'gateway.name: "GW1" is not a valid gateway name (1-15 of a-z, 0-9, -)'),
    (edit('name = "gw1"', 'name = "gateway-number-16"'),
     'gateway.name: "gateway-number-16" is not a valid gateway name (1-15 of a-z, 0-9, -)'),
    (edit('name = "gw1"', 'name = ""'), 'gateway.name: "" is not a valid gateway name (1-15 of a-z, 0-9, -)'),
    (edit('interface = "eth1"', 'interface = "eth/1"'), 'gateway.interface: "eth/1" is not a valid interface name'),
    (edit('interface = "eth1"', 'interface = "eth 1"'), 'gateway.interface: "eth 1" is not a valid interface name'),
    (edit('interface = "eth1"', 'interface = "0123456789abcdef"'),
     'gateway.interface: "0123456789abcdef" is not a valid interface name'),
    (edit('interface = "eth1"', 'interface = ""'), 'gateway.interface: "" is not a valid interface name'),
    (edit('interface = "eth1"', 'interface = ".."'), 'gateway.interface: ".." is not a valid interface name'),
    (edit('xdp_mode = "native"', 'xdp_mode = "offload"'),
     'gateway.xdp_mode: "offload" is not one of auto, native, generic'),
    (edit('api_socket = "/run/xdpgw/test.sock"', 'api_socket = "gw1.sock"'),
     'gateway.api_socket: "gw1.sock" is not an absolute path'),
    (edit('api_socket = "/run/xdpgw/test.sock"', f'api_socket = "/{"s" * 107}"'),
     f'gateway.api_socket: "/{"s" * 107}" is longer than the 107 bytes of a socket path'),
    (edit("flow_table_size = 4096", "flow_table_size = 1023"),
     "gateway.flow_table_size: 1023 is out of range 1024..16777216"),
    (edit("flow_table_size = 4096", "flow_table_size = 16777217"),
     "gateway.flow_table_size: 16777217 is out of range 1024..16777216"),
    (edit("maglev_table_size = 251", "maglev_table_size = 250"),
     "gateway.maglev_table_size: 250 is out of range 251..1000003"),
    (edit("maglev_table_size = 251", "maglev_table_size = 1000033"),
     "gateway.maglev_table_size: 1000033 is out of range 251..1000003"),
    (edit("maglev_table_size = 251", "maglev_table_size = 65536"), "gateway.maglev_table_size: 65536 is not prime"),
    (edit("hash_seed = 42", "hash_seed = -1"), "gateway.hash_seed: -1 is out of range 0..4294967295"),
    (edit("hash_seed = 42", "hash_seed = 4294967296"), "gateway.hash_seed: 4294967296 is out of range 0..4294967295"),
    (edit("max_services = 4", "max_services = 0"), "gateway.max_services: 0 is out of range 1..4096"),
    (edit("max_services = 4", "max_services = 4097"), "gateway.max_services: 4097 is out of range 1..4096"),
    (edit("max_vms = 8", "max_vms = 65536"), "gateway.max_vms: 65536 is out of range 1..65535"),
    (edit("max_regions = 4", "max_regions = 0"), "gateway.max_regions: 0 is out of range 1..65535"),
    (edit("stats_interval = 0.5", "stats_interval = 0"),
     "gateway.stats_interval: 0 is not a positive number of seconds"),
    (edit("stats_interval = 0.5", "stats_interval = -1.5"),
     "gateway.stats_interval: -1.5 is not a positive number of seconds"),
    (edit("stats_interval = 0.5", "stats_interval = inf"),
     "gateway.stats_interval: inf is not a positive number of seconds"),
    (edit("stats_interval = 0.5", "stats_interval = nan"),
     "gateway.stats_interval: nan is not a positive number of seconds"),
    # addresses and prefixes
    (edit('tunnel_source = "198.18.0.2"', 'tunnel_source = "2001:db8::2"'),
     "gateway.tunnel_source: expected an IPv4 address, got IPv6 address 2001:db8::2"),
    (edit('tunnel_source6 = "2001:db8::2"', 'tunnel_source6 = "198.18.0.2"'),
     "gateway.tunnel_source6: expected an IPv6 address, got IPv4 address 198.18.0.2"),
    (edit('tunnel_source = "198.18.0.2"', 'tunnel_source = "198.18.0.256"'),
     'gateway.tunnel_source: "198.18.0.256" is not an IPv4 or IPv6 address'),
    (edit('vip = "198.19.0.10"', 'vip = "198.19.0.10/32"'),
     'service[0].vip: "198.19.0.10/32" is not an IPv4 or IPv6 address'),
    (edit('ip = "198.18.101.2"', 'ip = "vm1.example"'), 'vm[0].ip: "vm1.example" is not an IPv4 or IPv6 address'),
    (edit('"198.18.102.2", "2001', '"198.18.102", "2001'), 'vm[1].ips[0]: "198.18.102" is not an IPv4 or IPv6 address'),
    (edit('"198.18.102.2", "2001', '5, "2001'), "vm[1].ips[0]: expected an IP address string, got integer 5"),
    (edit('ips = ["198.18.102.2", "2001:db8:101::2"]', 'ips = "2001:db8:101::2"'),
     'vm[1].ips: expected an array, got string "2001:db8:101::2"'),
    (edit('"198.18.102.2", "2001:db8:101::2"', '"198.18.102.2", "::ffff:198.18.102.3"'),
     "vm[1].ips[1]: ::ffff:c612:6603 is IPv4-mapped; write it as 198.18.102.3"),
    (edit('ip = "198.18.101.2"', 'ip = "198.18.101.2"\nips = ["198.18.101.3"]'),
     "vm[0].ip: set ip or ips, not both (ip is shorthand for a one-address ips)"),
    (edit('tunnel = "198.18.200.2"', 'tunnel = "198.18.200"'),
     'vm[2].tunnel: "198.18.200" is not an IPv4 or IPv6 address'),
    (edit('vip = "198.19.0.10"', 'vip = "::ffff:198.19.0.10"'),
     "service[0].vip: ::ffff:c613:a is IPv4-mapped; write it as 198.19.0.10"),
    (edit('"198.18.1.0/24", "2001', '"198.18.1.1/24", "2001'),
     'region[0].prefixes[0]: "198.18.1.1/24" has host bits set (the prefix is 198.18.1.0/24)'),
    (edit('"2001:db8:1::/48"', '"2001:db8:1::1/48"'),
     'region[0].prefixes[1]: "2001:db8:1::1/48" has host bits set (the prefix is 2001:db8:1::/48)'),
    (edit('"198.18.2.0/24"', '"198.18.2.0/33"'),
     'region[1].prefixes[0]: "198.18.2.0/33" is not an IPv4 or IPv6 CIDR prefix'),
    (edit('prefixes = ["198.18.2.0/24"]', "prefixes = []"), "region[1].prefixes: must not be empty"),
    # MACs
    (edit('mac = "02:00:00:00:00:01"', 'mac = "02:00:00:00:00"'),
     "vm[0].mac: \"02:00:00:00:00\" is not a MAC address (six hex octets separated by ':')"),
    (edit('mac = "02:00:00:00:00:01"', 'mac = "02-00-00-00-00-01"'),
     "vm[0].mac: \"02-00-00-00-00-01\" is not a MAC address (six hex octets separated by ':')"),
    (edit('mac = "02:00:00:00:00:01"', 'mac = "02:00:00:00:00:0g"'),
     "vm[0].mac: \"02:00:00:00:00:0g\" is not a MAC address (six hex octets separated by ':')"),
    (edit('mac = "02:00:00:00:00:01"', 'mac = "01:00:5E:00:00:01"'),
     "vm[0].mac: 01:00:5e:00:00:01 is a multicast or broadcast MAC; a unicast MAC is needed"),
    (edit('mac = "02:00:00:00:00:01"', 'mac = "ff:ff:ff:ff:ff:ff"'),
     "vm[0].mac: ff:ff:ff:ff:ff:ff is a multicast or broadcast MAC; a unicast MAC is needed"),
    (edit('mac = "02:00:00:00:00:01"', 'mac = "00:00:00:00:00:00"'),
     "vm[0].mac: 00:00:00:00:00:00 is the all-zero MAC; a unicast MAC is needed"),
    (edit('next_hop_mac = "02:00:00:00:02:01"', 'next_hop_mac = "33:33:00:00:00:01"'),
     "gateway.next_hop_mac: 33:33:00:00:00:01 is a multicast or broadcast MAC; a unicast MAC is needed"),
    # services and VMs: values
    (edit("port = 8080", "port = 0"), "service[0].port: 0 is out of range 1..65535"),
    (edit("port = 8080", "port = 65536"), "service[0].port: 65536 is out of range 1..65535"),
    (edit('protocol = "tcp"', 'protocol = "sctp"'), 'service[0].protocol: "sctp" is not one of tcp, udp'),
    (edit('vms = ["vm1", "vm2"]', "vms = []"), "service[0].vms: must not be empty"),
    (edit('name = "web"', 'name = "my web"'), 'service[0].name: "my web" is not a valid name'),
    (edit('name = "r1"', 'name = ""'), 'region[0].name: "" is not a valid name'),
    (edit("weight = 2", "weight = -1"), "vm[0].weight: -1 is out of range 0..65535"),
    (edit('port = "gw-vm1"', 'port = "gw:vm1"'), 'vm[0].port: "gw:vm1" is not a valid interface name'),
    # duplicates and relations
    (edit('name = "r2"', 'name = "r1"'), 'region[1].name: duplicate region name "r1" (also region[0])'),
    (edit('name = "dns"', 'name = "web"'), 'service[1].name: duplicate service name "web" (also service[0])'),
    (edit('name = "vm9"', 'name = "vm1"'), 'vm[2].name: duplicate vm name "vm1" (also vm[0])'),
    (edit('vip = "2001:db8:f::53"\nport = 53\nprotocol = "udp"', 'vip = "198.19.0.10"\nport = 8080\nprotocol = "tcp"'),
     'service[1] "dns": same vip, port and protocol (198.19.0.10, 8080, tcp) as service[0] "web"'),
    (edit('prefixes = ["198.18.2.0/24"]', 'prefixes = ["2001:db8:1::/48"]'),
     'region[1] "r2".prefixes: 2001:db8:1::/48 is also in region[0] "r1"'),
    (edit('prefixes = ["198.18.2.0/24"]', 'prefixes = ["198.18.2.0/24", "198.18.2.0/24"]'),
     'region[1] "r2".prefixes: 198.18.2.0/24 is listed twice'),
    (edit('vms = ["vm1", "vm2"]', 'vms = ["vm1", "vm7"]'), 'service[0] "web".vms: unknown VM "vm7"'),
    (edit('vms = ["vm1", "vm2"]', 'vms = ["vm1", "vm1"]'), 'service[0] "web".vms: VM "vm1" is listed twice'),
    (edit('port = "gw-vm1"', 'port = "gw-vm1"\ntunnel = "198.18.200.3"'),
     'vm[0] "vm1": has both port and tunnel; set exactly one'),
    (edit('tunnel = "198.18.200.2"\n', ""), 'vm[2] "vm9": has neither port nor tunnel; set exactly one'),
    (edit('mac = "02:00:00:00:00:01"\n', ""), 'vm[0] "vm1".mac: missing; required with port'),
    (edit('tunnel_source = "198.18.0.2"\n', ""),
     'vm[2] "vm9".tunnel: IPv4 endpoint 198.18.200.2 needs gateway.tunnel_source, which is not set'),
    (edit('tunnel_source6 = "2001:db8::2"\n', ""),
     'vm[3] "vm6".tunnel: IPv6 endpoint 2001:db8:200::2 needs gateway.tunnel_source6, which is not set'),
    (edit('mac = "02:00:00:00:00:0A"', 'mac = "02:00:00:00:00:01"'),
     'vm[1] "vm2".mac: 02:00:00:00:00:01 is also the MAC of vm[0] "vm1"'),
    (edit('"198.18.102.2", "2001:db8:101::2"', '"2001:db8:101::2", "2001:db8:101:0::2"'),
     "vm[1].ips[1]: 2001:db8:101::2 is listed twice"),
    (edit('"198.18.102.2", "2001', '"198.18.101.2", "2001'),
     'vm[1] "vm2".ips[0]: 198.18.101.2 is also an address of vm[0] "vm1"'),
    (edit('name = "vm9"\n', 'name = "vm9"\nips = ["198.18.201.9", "2001:db8:101::2"]\n'),
     'vm[2] "vm9".ips[1]: 2001:db8:101::2 is also an address of vm[1] "vm2"'),
    # capacity
    (edit("max_vms = 8", "max_vms = 3"), "gateway.max_vms: 3 is less than the 4 [[vm]] entries"),
    (edit("max_services = 4", "max_services = 1"), "gateway.max_services: 1 is less than the 2 [[service]] entries"),
    (edit("max_regions = 4", "max_regions = 1"), "gateway.max_regions: 1 is less than the 2 [[region]] entries"),
]


@pytest.mark.parametrize("text, expected", ERRORS, ids=[e for _, e in ERRORS])
def test_error(text: str, expected: str) -> None:
    message = error_of(text)
    assert message == expected
    assert len(message.splitlines()) == 1


def test_maglev_table_must_exceed_vms_of_every_service() -> None:
    names = [f"vm{i}" for i in range(251)]
    config = Config(
        GatewayConfig("gw1", "eth1", maglev_table_size=251),
        services=(ServiceConfig("big", ip_address("198.19.0.1"), 80, "tcp", tuple(names)),),
        vms=tuple(VMConfig(n, port="p", mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}") for i, n in enumerate(names)),
    )
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert str(info.value) == (
        'gateway.maglev_table_size: 251 is not larger than the 251 VMs of service[0] "big"'
    )
    bigger = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, maglev_table_size=257))
    assert validate(bigger).gateway.maglev_table_size == 257


@pytest.mark.parametrize(
    "config, expected",
    [
        (Config(GatewayConfig("gw1", "eth1", tunnel_source="198.18.0.2")),  # type: ignore[arg-type]
         'gateway.tunnel_source: expected an IPv4 address, got string "198.18.0.2"'),
        (Config(GatewayConfig("gw1", "eth1"), vms=(VMConfig("a", tunnel="198.18.0.9"),)),  # type: ignore[arg-type]
         'vm[0].tunnel: expected an IP address, got string "198.18.0.9"'),
        (Config(GatewayConfig("gw1", "eth1"),
                vms=(VMConfig("a", ips=("198.18.0.9",), port="p", mac="02:00:00:00:00:01"),)),  # type: ignore[arg-type]
         'vm[0].ips[0]: expected an IP address, got string "198.18.0.9"'),
        (Config(GatewayConfig("gw1", "eth1"),
                vms=(VMConfig("a", ips=ip_address("198.18.0.9"),  # type: ignore[arg-type]
                              port="p", mac="02:00:00:00:00:01"),)),
         "vm[0].ips: expected an array, got IPv4 address 198.18.0.9"),
        (Config(GatewayConfig("gw1", "eth1"), (RegionConfig("r", ("198.18.0.0/24",)),)),  # type: ignore[arg-type]
         'region[0].prefixes[0]: expected an IP network, got string "198.18.0.0/24"'),
        (Config(GatewayConfig("gw1", "eth1"), vms=(RegionConfig("r", ()),)),  # type: ignore[arg-type]
         "vm[0]: expected a VMConfig, got RegionConfig"),
        (Config(None), "gateway: expected a GatewayConfig, got NoneType"),  # type: ignore[arg-type]
        (Config(GatewayConfig("gw1", "eth1"), services={}),  # type: ignore[arg-type]
         "service: expected an array, got table"),
    ],
)
def test_validate_rejects_wrong_python_types(config: Config, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert str(info.value) == expected


# ---------------------------------------------------------------- property: any valid config round-trips

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)
# Kernel-valid names beyond the usual: punctuation and a non-ASCII letter (2 bytes in UTF-8).
_ifnames = st.text(
    alphabet=st.sampled_from("abcxyz019-_.@%+=\"'\\é"), min_size=1, max_size=15
).filter(lambda s: len(s.encode()) <= 15 and s not in (".", ".."))
_addresses6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
_addresses = st.one_of(st.ip_addresses(v=4), _addresses6)
_macs = st.tuples(st.integers(0, 127).map(lambda b: b * 2), st.lists(st.integers(0, 255), min_size=5, max_size=5)).map(
    lambda t: ":".join(f"{b:02x}" for b in [t[0], *t[1]])
).filter(lambda m: m != "00:00:00:00:00:00")
_prefixes = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), st.tuples(st.ip_addresses(v=6), st.integers(0, 128))
).map(lambda t: ip_network(t, strict=False))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    gateway = GatewayConfig(
        name=draw(st.from_regex(r"[a-z0-9-]{1,15}", fullmatch=True)),
        interface=draw(_ifnames),
        xdp_mode=draw(st.sampled_from(["auto", "native", "generic"])),
        tunnel_source=draw(st.ip_addresses(v=4)),
        tunnel_source6=draw(_addresses6),
        next_hop_mac=draw(st.none() | _macs),
        # Quotes, backslashes, control characters and non-ASCII test the TOML string writer.
        api_socket="/" + draw(st.text(max_size=26)).replace("\0", ""),  # <= 105 bytes
        flow_table_size=draw(st.integers(1024, 1 << 24)),
        maglev_table_size=draw(st.sampled_from([251, 257, 65537, 1000003])),
        hash_seed=draw(st.integers(0, 2**32 - 1)),
        stats_interval=draw(st.floats(min_value=1e-6, max_value=1e6)),
    )
    vm_names = draw(st.lists(_names, max_size=6, unique=True))
    macs = draw(st.lists(_macs, min_size=len(vm_names), max_size=len(vm_names), unique=True))
    # addresses are unique across VMs: each VM takes its own slice of one unique list
    addresses = draw(st.lists(_addresses, max_size=3 * len(vm_names), unique=True))
    vms = []
    for i, (name, mac) in enumerate(zip(vm_names, macs)):
        if draw(st.booleans()):
            place = {"port": draw(_ifnames), "mac": mac}
        else:
            place = {"tunnel": draw(_addresses), "mac": draw(st.none() | st.just(mac))}
        vms.append(VMConfig(name, ips=tuple(addresses[3 * i:3 * i + 3]), weight=draw(st.integers(0, 65535)), **place))
    prefixes = draw(st.lists(_prefixes, min_size=0, max_size=8, unique=True))
    region_names = draw(st.lists(_names, min_size=len(prefixes) // 2, max_size=len(prefixes) // 2, unique=True))
    regions = [RegionConfig(n, tuple(prefixes[2 * i : 2 * i + 2])) for i, n in enumerate(region_names)]
    services = []
    if vm_names:
        keys = draw(st.lists(st.tuples(_addresses, st.integers(1, 65535), st.sampled_from(["tcp", "udp"])),
                             max_size=4, unique=True))
        service_names = draw(st.lists(_names, min_size=len(keys), max_size=len(keys), unique=True))
        for name, (vip, port, protocol) in zip(service_names, keys):
            members = draw(st.lists(st.sampled_from(vm_names), min_size=1, unique=True))
            services.append(ServiceConfig(name, vip, port, protocol, tuple(members)))
    return Config(gateway, tuple(regions), tuple(services), tuple(vms))


@given(configs())
def test_any_valid_config_round_trips(config: Config) -> None:
    c = validate(config)
    assert validate(c) == c
    assert parse_config(c.to_toml()) == c
