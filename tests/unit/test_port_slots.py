"""PortSlots, the devmap slot allocator: one slot per port in use, freed slots
reused oldest-first, a re-created port re-pointed in place. Through the XDP
program and the gateway: tests/xdp/test_port_slots.py."""
from __future__ import annotations

import pytest

from dataplane.maps import PortSlots
from dataplane.program import Sizes


class RecordingDataplane:
    """What PortSlots writes to the devmap."""

    def __init__(self, max_ports: int) -> None:
        self.sizes = Sizes(max_ports=max_ports)
        self.devmap: dict[int, int] = {}

    def set_port(self, slot: int, ifindex: int) -> None:
        self.devmap[slot] = ifindex

    def clear_port(self, slot: int) -> None:
        self.devmap.pop(slot, None)


def test_port_slots_reuse_freed_slots_oldest_first_and_repoint_recreated_ports():
    dp = RecordingDataplane(4)                 # slots 1..3
    slots = PortSlots(dp)
    assert [slots.allocate(p, i) for p, i in (("a", 10), ("b", 11), ("c", 12))] == [1, 2, 3]
    assert slots.allocate("a", 10) == 1
    with pytest.raises(ValueError, match="'d'.*all 3 port slots are in use"):
        slots.allocate("d", 13)
    assert dp.devmap == {1: 10, 2: 11, 3: 12}
    slots.release("b")
    slots.release("a")
    assert dp.devmap == {3: 12}
    assert slots.allocate("d", 13) == 2        # freed first, reused first
    assert slots.allocate("c", 22) == 3        # re-created: same slot, new ifindex
    assert dp.devmap == {2: 13, 3: 22} and slots.ports() == {"c": 3, "d": 2}
