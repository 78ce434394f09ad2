"""A VM's location is a (host, port) every gateway shares; each gateway derives its
own forwarding from it (control/vms.py forwarding): a local port on its own hosts,
a tunnel to the host's endpoint otherwise. Configs without hosts keep meaning what
they meant."""
import ipaddress

import pytest

from control.config import ConfigError, parse_config
from control.vms import Forwarding, Location, LocationError, forwarding, host_of_port

BASE = """
[gateway]
name = "gw1"
interface = "up0"
tunnel_source = "198.18.0.2"
{own}

[[host]]
name = "ha"
ports = ["gwv1", "gwv?a"]
endpoint = "198.18.50.1"

[[host]]
name = "hb"
ports = ["gwv3"]
endpoint6 = "2001:db8:50::1"

[[vm]]
name = "vm1"
host = "ha"
port = "gwv1"
mac = "02:00:00:00:00:01"

[[vm]]
name = "vm9"
tunnel = "198.18.200.2"

[[vm]]
name = "vm5"
port = "gwv5"
mac = "02:00:00:00:00:05"
"""


def config(own: str):
    return parse_config(BASE.format(own=own))


def test_own_host_is_a_local_port_other_host_a_tunnel_to_its_endpoint():
    c = config('tunnel_source6 = "2001:db8::2"\nhosts = ["ha"]')
    mac = "02:00:00:00:00:01"
    assert forwarding(Location("ha", "gwv1", mac), c) == Forwarding(port="gwv1", mac=mac)
    assert forwarding(Location("hb", "gwv3", mac), c) == Forwarding(tunnel=ipaddress.ip_address("2001:db8:50::1"))
    # the old forms: a port with no host is this gateway's port; a bare tunnel is a tunnel
    assert forwarding(Location(None, "gwv5", mac), c) == Forwarding(port="gwv5", mac=mac)
    assert forwarding(Location(tunnel=ipaddress.ip_address("198.18.200.2")), c).tunnel == \
        ipaddress.ip_address("198.18.200.2")
    with pytest.raises(LocationError, match="'hz' is not a"):
        forwarding(Location("hz", "gwv1", mac), c)
    assert host_of_port("gwv1a", c) == "ha" and host_of_port("gwv3", c) is None   # hb is not gw1's


def test_the_same_location_on_a_gateway_that_does_not_own_the_host():
    c = config("hosts = []")
    assert forwarding(Location.of(c.vm("vm1")), c) == Forwarding(tunnel=ipaddress.ip_address("198.18.50.1"))


def test_location_round_trips_through_the_store_form():
    loc = Location("ha", "gwv1", "02:00:00:00:00:01")
    assert Location.from_dict(loc.as_dict()) == loc
    t = Location(tunnel=ipaddress.ip_address("2001:db8:50::1"))
    assert Location.from_dict(t.as_dict()) == t


@pytest.mark.parametrize("own, replace, key", [
    ('hosts = ["hx"]', {}, "gateway.hosts[0]"),
    ('hosts = ["ha"]', {'host = "ha"': 'host = "hq"'}, 'vm[0] "vm1".host'),
    ('hosts = []', {'endpoint = "198.18.50.1"': 'capacity = 4'}, "host[0].endpoint"),
    ('hosts = ["ha"]', {'endpoint = "198.18.50.1"': 'endpoint = "2001:db8::9"'}, "host[0].endpoint"),
])
def test_bad_host_config_names_the_key(own, replace, key):
    text = BASE.format(own=own)
    for a, b in replace.items():
        text = text.replace(a, b)
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert e.value.key == key, str(e.value)


def test_peers_are_gone():
    with pytest.raises(ConfigError, match="gateway.peers: unknown key"):
        parse_config(BASE.format(own='peers = ["/run/xdpgw/gw2.sock"]'))
