"""Dataplane.set_vms, the one batch write of VM locations at a gateway's start:
the entries it writes are those set_vm writes, packets go where they say, and an
entry set_vm would refuse is refused with set_vm's message and nothing written."""
import socket

import pytest
from scapy.all import IP, TCP, Raw

from tests.xdp.harness import LOCAL_VMS, TUNNEL4_VM, TUNNEL6_VM, VIP4, WEB

STATES = {1: "active", 2: "active", 3: "draining", TUNNEL4_VM: "active", TUNNEL6_VM: "down"}


def where(gw, vm_id):
    return gw.local_port(vm_id) if vm_id in LOCAL_VMS else gw.tunnel(vm_id)


def locations(gw) -> dict[int, bytes]:
    return {v: bytes(gw.dp.vm_location(v)) for v in STATES}


def test_batch_writes_what_single_updates_write(gw):
    for vm_id, state in STATES.items():
        gw.dp.set_vm(vm_id, where(gw, vm_id), state)
    single = locations(gw)
    for vm_id in STATES:
        gw.dp.clear_vm(vm_id)
    gw.dp.set_vms([(vm_id, where(gw, vm_id), state) for vm_id, state in STATES.items()])
    assert locations(gw) == single
    assert all(gw.dp.vm_location(v).kind for v in STATES)       # written, not left cleared

    client = "198.18.2.61"
    sport = next(p for p in range(10000, 15000) if gw.maglev_vm(WEB, client, p, 8080, socket.IPPROTO_TCP) == 2)
    pkt = IP(src=client, dst=VIP4) / TCP(sport=sport, dport=8080, flags="A") / Raw(b"batch")
    r = gw.run(gw.ingress(pkt))
    assert r.verdict == "REDIRECT" and r.vm_id == 2 and r.port_slot == LOCAL_VMS[2][0]
    assert r.data == gw.expected_local(2, pkt)


@pytest.mark.parametrize("bad", [
    lambda gw: (5, gw.LocalPort(gw.sizes.max_ports, "02:00:00:00:00:05", "02:00:00:00:01:05"), "active"),
    lambda gw: (5, gw.tunnel(TUNNEL4_VM), "paused"),
    lambda gw: (gw.sizes.max_vms + 1, gw.tunnel(TUNNEL6_VM), "active"),
], ids=["port slot", "state", "vm id"])
def test_a_refused_entry_refuses_the_batch_with_set_vms_message(gw, bad):
    vm_id, place, state = bad(gw)
    with pytest.raises(ValueError) as single:
        gw.dp.set_vm(vm_id, place, state)
    before = locations(gw) | {4: bytes(gw.dp.vm_location(4))}
    with pytest.raises(ValueError) as batch:
        gw.dp.set_vms([(4, gw.tunnel(TUNNEL4_VM), "active"), (vm_id, place, state)])
    assert str(batch.value) == str(single.value)
    assert locations(gw) | {4: bytes(gw.dp.vm_location(4))} == before
    assert not gw.dp.vm_location(4).kind
