"""The gateway config that matches the built-in namespace testbed
(testbed/topology.py): used by `xdpgw demo` and the e2e tests."""
from __future__ import annotations

import ipaddress

from control.config import AgentConfig, CenterLinkConfig, Config, GatewayConfig, HealthConfig, MonitorConfig, \
    RegionConfig, ServiceConfig, VMConfig, validate
from testbed import addresses as tb
from testbed.topology import pin_dir, registry_path

WEB_PORT = 8080
ECHO_PORT = 5353
REMOTE_PORT = 8081


def testbed_config(prefix: str = tb.DEFAULT_PREFIX, name: str = "gw1", *, which: int = 1,
                   health: dict[str, HealthConfig] | None = None, monitor: MonitorConfig | None = None,
                   center: CenterLinkConfig | None = None, agent: AgentConfig | None = None,
                   **gateway: object) -> Config:
    """Regions r1/r2 (the two client subnets), services web (TCP), web6 (TCP/IPv6)
    and echo (UDP) on vm1..vm3, and remote (TCP) on vm9 behind dc2's tunnel endpoint.

    `which` = 2: the config of the testbed's second gateway (Testbed(gateways=2)):
    its namespace, uplink addresses and router; the VMs, services and regions are
    the same. `health`: service name -> its health check. `monitor`, `center`,
    `agent`: region offload (testbed/offload.py has the center and agent ends)."""
    ip = ipaddress.ip_address
    local = tuple(v.name for v in tb.VMS)
    vms = tuple(VMConfig(name=v.name, port=v.port, mac=v.mac, ips=(ip(v.ip), ip(v.ip6))) for v in tb.VMS)
    vms += (VMConfig(name="vm9", tunnel=ip(tb.DC2_ENDPOINT)),)
    health = health or {}
    services = (
        ServiceConfig(name="web", vip=ip(tb.VIP4), port=WEB_PORT, protocol="tcp", vms=local,
                      health=health.get("web")),
        ServiceConfig(name="web6", vip=ip(tb.VIP6), port=WEB_PORT, protocol="tcp", vms=local,
                      health=health.get("web6")),
        ServiceConfig(name="echo", vip=ip(tb.VIP4), port=ECHO_PORT, protocol="udp", vms=local,
                      health=health.get("echo")),
        ServiceConfig(name="remote", vip=ip(tb.VIP4), port=REMOTE_PORT, protocol="tcp", vms=("vm9",)),
    )
    unknown = set(health) - {s.name for s in services if s.name != "remote"}
    if unknown:
        raise ValueError(f"testbed_config: no health check for {sorted(unknown)} (vm9 has no address)")
    if which not in (1, 2):
        raise ValueError(f"testbed_config: which must be 1 or 2, got {which!r}")
    uplink = ((f"{prefix}-gw", tb.UPLINK_IP, tb.UPLINK_IP6, tb.ROUTER_MAC) if which == 1 else
              (f"{prefix}-{tb.GW2_ROLE}", tb.GW2_UPLINK_IP, tb.GW2_UPLINK_IP6, tb.ROUTER_GW2_MAC))
    settings = dict(name=name, interface=tb.UPLINK, netns=uplink[0], tunnel_source=ip(uplink[1]),
                    tunnel_source6=ip(uplink[2]), next_hop_mac=uplink[3],
                    api_socket=api_socket(prefix, name), pin_dir=pin_dir(prefix, name),
                    registry=registry_path(prefix, name),
                    flow_table_size=65536)
    settings.update(gateway)
    return validate(Config(gateway=GatewayConfig(**settings), regions=_regions(), services=services, vms=vms,
                           monitor=monitor, center=center, agent=agent))


def _regions() -> tuple[RegionConfig, ...]:
    """r1 and r2: the two client subnets, both families."""
    net = ipaddress.ip_network
    return tuple(RegionConfig(name=f"r{c.name[1:]}", prefixes=(net(c.subnet), net(c.subnet6))) for c in tb.CLIENTS)


DC2_GATEWAY = "dc2"


def dc2_config(prefix: str = tb.DEFAULT_PREFIX, **gateway: object) -> Config:
    """dc2's gateway (Testbed(dc2_gateway=True)): XDP on dc2's eth0, the decapsulator of
    the tunnels to DC2_ENDPOINT / DC2_ENDPOINT6 from the source gateways' uplinks
    (gw1's and gw2's subnets), regions r1/r2 (the offloaded clients' own), and no
    service or VM: dc2's agent adds them at run time (service.add, vm.add)."""
    ip = ipaddress.ip_address
    net = ipaddress.ip_interface
    sources = (f"{tb.UPLINK_IP}/24", f"{tb.UPLINK_IP6}/64", f"{tb.GW2_UPLINK_IP}/24", f"{tb.GW2_UPLINK_IP6}/64")
    settings = dict(name=DC2_GATEWAY, interface=tb.DC2_IF, netns=f"{prefix}-dc2", tunnel_source=ip(tb.DC2_ENDPOINT),
                    tunnel_source6=ip(tb.DC2_ENDPOINT6), next_hop_mac=tb.ROUTER_DC2_MAC,
                    decap_addresses=(ip(tb.DC2_ENDPOINT), ip(tb.DC2_ENDPOINT6)),
                    decap_from=tuple(net(s).network for s in sources),
                    api_socket=api_socket(prefix, DC2_GATEWAY), pin_dir=pin_dir(prefix, DC2_GATEWAY),
                    registry=registry_path(prefix, DC2_GATEWAY), flow_table_size=65536)
    settings.update(gateway)
    return validate(Config(gateway=GatewayConfig(**settings), regions=_regions()))


def api_socket(prefix: str, gateway: str) -> str:
    """Where a testbed gateway serves its API (dc2's agent calls dc2's there)."""
    return f"/run/xdpgw/{prefix}-{gateway}.sock"
