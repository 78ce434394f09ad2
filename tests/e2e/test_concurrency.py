"""Concurrent updates (issue 4.4): Maglev swaps, VM moves, state changes and
offload changes while packets flow. No packet is dropped for lack of a table
entry (the no_vm and vm_location drop counters stay at zero) and no flow ever
lands on a VM outside its service.

Runs the real Gateway (it needs the testbed's gateway interfaces, so the whole
body runs in a child inside the gateway namespace) and drives packets through
its loaded program with BPF_PROG_TEST_RUN from one thread while another thread
changes the gateway as fast as it can."""
from __future__ import annotations

import threading
import time

from testbed.addresses import DC2_ENDPOINT
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgc")
SECONDS = 5.0


def _body(prefix: str, seconds: float) -> dict:
    import functools
    import random

    from scapy.all import IP, TCP, UDP, Ether

    import control.gateway
    from control.gateway import Gateway
    from testbed.config import ECHO_PORT, WEB_PORT, testbed_config
    from dataplane import program
    from dataplane import structs as S
    from dataplane.testrun import TestRunner
    from testbed.addresses import VIP4

    # the test build of the program: its forward trace names the VM each packet went to
    control.gateway.load = functools.partial(program.load, trace=True)
    gw = Gateway(testbed_config(prefix, name="gwc"))
    gw.start()
    try:
        runner = TestRunner(gw.dataplane, gw.fn.fd)
        members = {gw.service_ids[s.name]: {gw.vms[n].vm_id for n in s.vms} for s in gw.config.services}
        before = gw.dataplane.drop_counters()
        rng = random.Random(7)
        sources = [f"198.18.{r}.{h}" for r in (1, 2) for h in range(2, 40)]
        frames = []
        for i, src in enumerate(sources):
            for sport in (1000 + i, 2000 + i):
                eth = Ether(dst="02:00:00:00:02:02", src="02:00:00:00:02:01")
                frames.append((WEB_PORT, bytes(eth / IP(src=src, dst=VIP4) / TCP(sport=sport, dport=WEB_PORT))))
                frames.append((ECHO_PORT, bytes(eth / IP(src=src, dst=VIP4) / UDP(sport=sport, dport=ECHO_PORT))))
        stop = threading.Event()
        seen = {"packets": 0, "outside": [], "verdicts": {}}

        def traffic() -> None:
            port_service = {WEB_PORT: gw.service_ids["web"], ECHO_PORT: gw.service_ids["echo"]}
            while not stop.is_set():
                port, frame = rng.choice(frames)
                r = runner.run(frame)
                seen["packets"] += 1
                seen["verdicts"][r.verdict] = seen["verdicts"].get(r.verdict, 0) + 1
                t = r.forward
                if t is not None and t.action != S.FWD_OFFLOAD and t.vm_id not in members[port_service[port]]:
                    seen["outside"].append((port, t.vm_id))

        worker = threading.Thread(target=traffic)
        worker.start()
        updates = 0
        deadline = time.monotonic() + seconds
        ops = ["state", "health", "move", "offload"]
        try:
            while time.monotonic() < deadline:       # bounded in time
                op = ops[updates % len(ops)]
                vm = ("vm1", "vm2")[updates % 2]      # vm3 always stays active: no service is left empty
                if op == "state":
                    gw.set_vm_state(vm, ("draining", "down", "active")[updates % 3])
                elif op == "health":
                    gw.set_vm_health({vm: "down"})
                    gw.set_vm_health({vm: "up"})
                elif op == "move":
                    gw.move_vm("vm1", port=("gwv1", "gwv2")[updates % 2])
                else:
                    gw.set_offload("r2", "web", DC2_ENDPOINT)
                    gw.clear_offload("r2", "web")
                updates += 1
        finally:
            stop.set()
            worker.join(timeout=10)
        after = gw.dataplane.drop_counters()
        return {"packets": seen["packets"], "updates": updates, "outside": seen["outside"][:10],
                "verdicts": seen["verdicts"],
                "drops": {k: after[k] - before[k] for k in after if after[k] != before[k]}}
    finally:
        gw.stop()


def test_updates_while_traffic_flows_drop_nothing_and_keep_flows_in_their_service():
    with running_testbed(PREFIX) as bed:
        result = bed.tb.run("gw", _body, PREFIX, SECONDS, timeout=120)
    assert result["updates"] >= 20 and result["packets"] > 500, result
    assert result["drops"] == {}, result
    assert result["outside"] == [], result
    assert set(result["verdicts"]) <= {"REDIRECT", "TX"}, result
