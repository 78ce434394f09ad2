"""control/config/: a service's `health` table: values, defaults, round
trip, and one error per rule, in the style of tests/unit/test_config.py."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.config import ConfigError, HealthConfig, parse_config, validate
from tests.unit.test_config import configs, edit, error_of

HEALTHY = edit('vms = ["vm1", "vm2"]\n',
               'vms = ["vm1", "vm2"]\n'
               'health = { kind = "tcp", interval = 1.0, timeout = 0.5, rise = 2, fall = 3 }\n')
HTTP = edit('vms = ["vm1", "vm2"]\n',
            'vms = ["vm1", "vm2"]\n'
            'health = { kind = "http", interval = 2, timeout = 1, rise = 1, fall = 5, port = 8081, '
            'path = "/healthz?full=1" }\n')
# dns (an IPv6 VIP) serves vm2 (both families), vm9 and vm6 (tunnels without addresses): give the
# tunnel VMs IPv6 addresses to probe
UDP = edit('protocol = "udp"\nvms = ["vm2", "vm9", "vm6"]\n',
           'protocol = "udp"\nvms = ["vm2", "vm9", "vm6"]\nhealth = { kind = "udp", payload = "ping" }\n',
           edit('tunnel = "198.18.200.2"\n', 'tunnel = "198.18.200.2"\nip = "2001:db8:201::9"\n',
                edit('tunnel = "2001:db8:200::2"\n', 'tunnel = "2001:db8:200::2"\nip = "2001:db8:201::6"\n')))


def test_health_values_and_defaults():
    c = parse_config(HEALTHY)
    assert c.service("web").health == HealthConfig("tcp", 1.0, 0.5, 2, 3)
    assert c.service("dns").health is None
    h = parse_config(HTTP).service("web").health
    assert h == HealthConfig("http", interval=2.0, timeout=1.0, rise=1, fall=5, port=8081, path="/healthz?full=1")
    assert isinstance(h.interval, float) and isinstance(h.timeout, float)
    u = parse_config(UDP).service("dns").health
    assert u == HealthConfig("udp", payload="ping")
    assert (u.interval, u.timeout, u.rise, u.fall, u.port, u.path) == (1.0, 0.5, 2, 3, None, None)
    minimal = parse_config(edit('vms = ["vm1", "vm2"]\n', 'vms = ["vm1", "vm2"]\nhealth = { kind = "tcp" }\n'))
    assert minimal.service("web").health == HealthConfig("tcp")


def test_health_as_a_subtable():
    text = HEALTHY.replace(
        'health = { kind = "tcp", interval = 1.0, timeout = 0.5, rise = 2, fall = 3 }\n', "") + \
        '\n[service.health]\nkind = "tcp"\nfall = 4\n'
    # [service.health] belongs to the last [[service]] (dns, whose tunnel VMs have no address)
    assert error_of(text) == ('vm[2] "vm9".ips: no IPv6 address; the health check of service[1] "dns" '
                              '(VIP 2001:db8:f::53) probes the VM at one')
    text = text.replace('vms = ["vm2", "vm9", "vm6"]', 'vms = ["vm2"]')
    assert parse_config(text).service("dns").health == HealthConfig("tcp", fall=4)


@pytest.mark.parametrize("text", [HEALTHY, HTTP, UDP], ids=["tcp", "http", "udp"])
def test_health_round_trip(text):
    c = parse_config(text)
    toml = c.to_toml()
    assert "health = { kind = " in toml
    assert parse_config(toml) == c
    assert validate(c) == c


HEALTH_ERRORS = [
    (edit('kind = "tcp"', 'kind = "icmp"', HEALTHY), 'service[0].health.kind: "icmp" is not one of tcp, http, udp'),
    (edit('kind = "tcp", ', "", HEALTHY), "service[0].health.kind: missing required key"),
    (edit("rise = 2", "rsie = 2", HEALTHY), "service[0].health.rsie: unknown key"),
    (edit('health = { kind = "tcp", interval = 1.0, timeout = 0.5, rise = 2, fall = 3 }', 'health = "tcp"', HEALTHY),
     'service[0].health: expected a table, got string "tcp"'),
    (edit("interval = 1.0", "interval = 0", HEALTHY),
     "service[0].health.interval: 0 is not a number of seconds in (0, 3600]"),
    (edit("interval = 1.0", "interval = 7200", HEALTHY),
     "service[0].health.interval: 7200 is not a number of seconds in (0, 3600]"),
    (edit("interval = 1.0", 'interval = "1s"', HEALTHY),
     'service[0].health.interval: expected a number of seconds, got string "1s"'),
    (edit("timeout = 0.5", "timeout = -1", HEALTHY),
     "service[0].health.timeout: -1 is not a number of seconds in (0, 3600]"),
    (edit("timeout = 0.5", "timeout = nan", HEALTHY),
     "service[0].health.timeout: nan is not a number of seconds in (0, 3600]"),
    (edit("timeout = 0.5", "timeout = 2.0", HEALTHY),
     "service[0].health.timeout: 2.0 is longer than the interval (1.0)"),
    (edit("rise = 2", "rise = 0", HEALTHY), "service[0].health.rise: 0 is out of range 1..100"),
    (edit("fall = 3", "fall = 101", HEALTHY), "service[0].health.fall: 101 is out of range 1..100"),
    (edit("fall = 3", "fall = true", HEALTHY), "service[0].health.fall: expected an integer, got boolean true"),
    (edit("port = 8081", "port = 0", HTTP), "service[0].health.port: 0 is out of range 1..65535"),
    (edit('path = "/healthz?full=1"', 'path = "healthz"', HTTP),
     'service[0].health.path: "healthz" is not a URL path (starts with /, no spaces)'),
    (edit('path = "/healthz?full=1"', 'path = "/a b"', HTTP),
     'service[0].health.path: "/a b" is not a URL path (starts with /, no spaces)'),
    (edit('fall = 3 }', 'fall = 3, path = "/" }', HEALTHY), 'service[0].health.path: only for kind "http", not "tcp"'),
    (edit('fall = 3 }', 'fall = 3, payload = "x" }', HEALTHY),
     'service[0].health.payload: only for kind "udp", not "tcp"'),
    (edit('payload = "ping"', 'payload = ""', UDP), "service[1].health.payload: must be 1 to 1024 bytes of UTF-8"),
    (edit('payload = "ping"', "payload = 7", UDP), "service[1].health.payload: expected a string, got integer 7"),
    # a checked VM needs an address of the VIP's family to probe; the error names the VM
    (edit('ip = "198.18.101.2"\n', "", HEALTHY), 'vm[0] "vm1".ips: no IPv4 address; the health check of '
                                                 'service[0] "web" (VIP 198.19.0.10) probes the VM at one'),
    (edit('ip = "198.18.101.2"\n', 'ip = "2001:db8:101::1"\n', HEALTHY),
     'vm[0] "vm1".ips: no IPv4 address; the health check of service[0] "web" (VIP 198.19.0.10) probes the VM at one'),
    (edit('ip = "2001:db8:201::9"\n', 'ip = "198.18.201.9"\n', UDP),
     'vm[2] "vm9".ips: no IPv6 address; the health check of service[1] "dns" (VIP 2001:db8:f::53) '
     'probes the VM at one'),
]


@pytest.mark.parametrize("text, expected", HEALTH_ERRORS, ids=[e for _, e in HEALTH_ERRORS])
def test_health_error(text, expected):
    message = error_of(text)
    assert message == expected
    assert len(message.splitlines()) == 1


def test_validate_checks_health_from_python():
    c = parse_config(HEALTHY)
    bad = dataclasses.replace(c, services=(dataclasses.replace(c.services[0], health={"kind": "tcp"}),
                                           *c.services[1:]))
    with pytest.raises(ConfigError) as info:
        validate(bad)
    assert str(info.value) == "service[0].health: expected a HealthConfig, got table"
    ints = dataclasses.replace(c, services=(dataclasses.replace(c.services[0], health=HealthConfig("tcp", 2, 1)),
                                            *c.services[1:]))
    assert validate(ints).service("web").health == HealthConfig("tcp", 2.0, 1.0)


_healths = st.builds(
    lambda kind, interval, frac, rise, fall, port, path, payload: HealthConfig(
        kind, interval, interval * frac, rise, fall, port,
        path if kind == "http" else None, payload if kind == "udp" else None),
    st.sampled_from(["tcp", "http", "udp"]), st.floats(0.001, 3600), st.floats(0.01, 1.0),
    st.integers(1, 100), st.integers(1, 100), st.none() | st.integers(1, 65535),
    st.none() | st.from_regex(r"/[!-~]{0,20}", fullmatch=True),
    st.none() | st.text(min_size=1, max_size=20).filter(lambda t: "\0" not in t))


@given(configs(), st.data())
def test_any_valid_config_with_health_round_trips(config, data):
    services = []
    for s in config.services:
        h = data.draw(st.none() | _healths)
        if h is not None and all(config.vm(n).address(s.vip.version) is not None for n in s.vms):
            s = dataclasses.replace(s, health=h)
        services.append(s)
    c = validate(dataclasses.replace(config, services=tuple(services)))
    assert parse_config(c.to_toml()) == c
