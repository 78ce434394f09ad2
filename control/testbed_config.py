"""The gateway config that matches the built-in namespace testbed
(dataplane/testbed.py): used by `xdpgw demo` and the integration tests."""
from __future__ import annotations

import ipaddress

from control.config import Config, GatewayConfig, RegionConfig, ServiceConfig, VMConfig, validate
from dataplane import testbed as tb

WEB_PORT = 8080
ECHO_PORT = 5353
REMOTE_PORT = 8081


def testbed_config(prefix: str = tb.DEFAULT_PREFIX, name: str = "gw1", **gateway: object) -> Config:
    """Regions r1/r2 (the two client subnets), services web (TCP), web6 (TCP/IPv6)
    and echo (UDP) on vm1..vm3, and remote (TCP) on vm9 behind dc2's tunnel endpoint."""
    ip = ipaddress.ip_address
    net = ipaddress.ip_network
    local = tuple(v.name for v in tb.VMS)
    vms = tuple(VMConfig(name=v.name, port=v.port, mac=v.mac, ip=ip(v.ip)) for v in tb.VMS)
    vms += (VMConfig(name="vm9", tunnel=ip(tb.DC2_ENDPOINT)),)
    regions = tuple(RegionConfig(name=f"r{c.name[1:]}", prefixes=(net(c.subnet), net(c.subnet6)))
                    for c in tb.CLIENTS)
    services = (
        ServiceConfig(name="web", vip=ip(tb.VIP4), port=WEB_PORT, protocol="tcp", vms=local),
        ServiceConfig(name="web6", vip=ip(tb.VIP6), port=WEB_PORT, protocol="tcp", vms=local),
        ServiceConfig(name="echo", vip=ip(tb.VIP4), port=ECHO_PORT, protocol="udp", vms=local),
        ServiceConfig(name="remote", vip=ip(tb.VIP4), port=REMOTE_PORT, protocol="tcp", vms=("vm9",)),
    )
    settings = dict(name=name, interface=tb.UPLINK, netns=f"{prefix}-gw", tunnel_source=ip(tb.UPLINK_IP),
                    tunnel_source6=ip(tb.UPLINK_IP6), next_hop_mac=tb.ROUTER_MAC,
                    api_socket=f"/run/xdpgw/{prefix}-{name}.sock", pin_dir=tb.pin_dir(prefix, name),
                    flow_table_size=65536)
    settings.update(gateway)
    return validate(Config(gateway=GatewayConfig(**settings), regions=regions, services=services, vms=vms))
