"""`xdpgw capture` end to end: the real daemon in the testbed's gateway namespace,
the capture CLI beside it, real datagrams from a client namespace through the
router. The pcap is read back with tcpdump and with scapy and compared with
what was sent; the capture's lease ends with the CLI, however it ends.

One testbed and one daemon for the module (prefix "xgc" + 3 random hex digits);
the fixture stops every process by pid and removes the namespaces."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from control.api import unix as api
from testbed.addresses import ROUTER_MAC, UPLINK_MAC, VIP4
from testbed.config import ECHO_PORT
from testbed.config import testbed_config as make_config
from testbed.kit import GatewayDaemon, start_server, udp_exchange, vm_binds
from testbed.topology import Testbed
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xgc")
WAIT_S = 20.0


@dataclass
class Env:
    tb: Testbed
    daemon: GatewayDaemon
    config_path: str
    sock: str
    tmp: Path

    def capture(self, *flags: str) -> subprocess.Popen:
        """`xdpgw capture FLAGS` in the gateway namespace, once it says it is capturing."""
        # unbuffered: a line read never pulls the next one out of select()'s sight
        proc = self.tb.popen("gw", [self.daemon.xdpgw, "capture", "--config", self.config_path, *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        return wait_armed(self.tb, proc)

    def send_udp(self, payloads: list[bytes]) -> list[tuple[int, bytes, str]]:
        """Datagrams from c1 to the echo service, one socket (flow) each: (source port,
        payload, the VM that echoed it)."""
        c1 = self.tb.client("c1")
        out = []
        for payload in payloads:
            s = self.tb.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.settimeout(2.0)
                s.bind((c1.ip, 0))
                answer = udp_exchange(s, payload, (VIP4, ECHO_PORT))
                assert answer is not None and answer.endswith(b":" + payload), answer
                out.append((s.getsockname()[1], payload, answer.split(b":")[0].decode()))
            finally:
                s.close()
        return out


def wait_armed(tb: Testbed, proc: subprocess.Popen) -> subprocess.Popen:
    """Read the CLI's stderr (bounded) until its "capturing" line."""
    deadline = time.monotonic() + WAIT_S
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if b"xdpgw: capturing" in line:
                return proc
            if not line and proc.poll() is not None:
                break
    tb.stop(proc)
    pytest.fail(f"xdpgw capture did not arm: {seen.decode(errors='replace')}")


def finish(tb: Testbed, proc: subprocess.Popen) -> tuple[int, bytes, bytes]:
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        tb.stop(proc)
        pytest.fail("xdpgw capture did not stop by itself")
    tb.stop(proc)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdpgw-capture")
    with running_testbed(PREFIX) as bed:
        config = make_config(PREFIX)
        path = tmp / "xdpgw.toml"
        daemon = bed.launch(config, path)
        for vm in bed.tb.vms:
            start_server(bed.tb, vm.name, vm.name, vm_binds())
        yield Env(bed.tb, daemon, str(path), config.gateway.api_socket, tmp)


def test_capture_to_a_file_holds_what_was_sent_as_received_and_as_sent(env):
    pcap = env.tmp / "echo.pcap"
    proc = env.capture("--service", "echo", "-c", "3", "-w", str(pcap), "--summary")
    sent = env.send_udp([b"first", b"second datagram", b"x" * 300])
    rc, _, err = finish(env.tb, proc)
    assert rc == 0, err
    c1 = env.tb.client("c1")

    # tcpdump's reading: each datagram as received (router -> uplink) and as sent (port -> VM)
    lines = subprocess.run(["tcpdump", "-nn", "-q", "-e", "-r", str(pcap)], capture_output=True, text=True,
                           timeout=30, check=True).stdout.splitlines()
    assert len(lines) == 6, lines
    for i, (sport, payload, vm_name) in enumerate(sent):
        vm = env.tb.vm(vm_name)
        rx, tx = lines[2 * i], lines[2 * i + 1]
        flow = f"{c1.ip}.{sport} > {VIP4}.{ECHO_PORT}: UDP, length {len(payload)}"
        assert f"{ROUTER_MAC} > {UPLINK_MAC}" in rx and flow in rx, rx
        assert f"{vm.port_mac} > {vm.mac}" in tx and flow in tx, tx

    # scapy's reading: exact fields and payloads; the IP packet is the same in both frames
    from scapy.all import IP, UDP, Ether, rdpcap

    frames = rdpcap(str(pcap))
    assert len(frames) == 6
    for i, (sport, payload, vm_name) in enumerate(sent):
        rx, tx = frames[2 * i], frames[2 * i + 1]
        vm = env.tb.vm(vm_name)
        assert (rx[Ether].src, rx[Ether].dst) == (ROUTER_MAC, UPLINK_MAC)
        assert (tx[Ether].src, tx[Ether].dst) == (vm.port_mac, vm.mac)
        for f in (rx, tx):
            assert (f[IP].src, f[IP].dst, f[UDP].sport, f[UDP].dport) == (c1.ip, VIP4, sport, ECHO_PORT)
            assert bytes(f[UDP].payload) == payload
        assert bytes(rx[IP]) == bytes(tx[IP])
        assert rx.time <= tx.time and abs(float(rx.time) - time.time()) < 120

    summaries = [line for line in err.decode().splitlines() if line.startswith("verdict=")]
    assert [(s.split()[0], s.split()[3], s.split()[4]) for s in summaries] == \
        [("verdict=forward", "service=echo", f"vm={vm_name}") for _, _, vm_name in sent]
    assert "xdpgw: 3 packets captured" in err.decode()


def test_capture_to_stdout_into_tcpdump(env):
    cmd = (f"{env.daemon.xdpgw} capture --config {env.config_path} --service echo --snaplen 64 -c 2"
           " | tcpdump -nn -q -r -")
    proc = env.tb.popen("gw", ["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    wait_armed(env.tb, proc)
    sent = env.send_udp([b"to stdout", b"y" * 500])
    rc, out, err = finish(env.tb, proc)
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 4, (lines, err)
    for i, (sport, payload, _) in enumerate(sent):
        for line in lines[2 * i:2 * i + 2]:
            assert f"{env.tb.client('c1').ip}.{sport} > {VIP4}.{ECHO_PORT}: UDP, length {len(payload)}" in line


def test_ctrl_c_flushes_disarms_and_exits_0(env):
    pcap = env.tmp / "interrupted.pcap"
    proc = env.capture("--service", "echo", "-w", str(pcap), "--summary")
    sent = env.send_udp([b"before ctrl-c", b"and this"])
    seen = []
    deadline = time.monotonic() + WAIT_S
    while len(seen) < len(sent) and time.monotonic() < deadline:   # both written (summary lines follow)
        if select.select([proc.stderr], [], [], 0.5)[0]:
            line = proc.stderr.readline()
            if line.startswith(b"verdict="):
                seen.append(line)
    assert len(seen) == len(sent)
    os.kill(proc.pid, signal.SIGINT)
    rc, _, err = finish(env.tb, proc)
    assert rc == 0 and b"xdpgw: 2 packets captured" in err, err
    from scapy.all import UDP, rdpcap

    assert [bytes(f[UDP].payload) for f in rdpcap(str(pcap))] == [p for _, p, _ in sent for _ in (0, 1)]
    api.call(env.sock, "capture.start", pid=os.getpid())           # disarmed: a new capture may start
    api.call(env.sock, "capture.stop", pid=os.getpid())


def test_a_capture_is_disarmed_when_its_cli_dies(env):
    proc = env.capture("--verdict", "pass", "-w", str(env.tmp / "killed.pcap"))
    with pytest.raises(api.ApiError, match="already running"):
        api.call(env.sock, "capture.start", pid=os.getpid())
    os.kill(proc.pid, signal.SIGKILL)
    env.tb.stop(proc)
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            started = api.call(env.sock, "capture.start", pid=os.getpid())
            break
        except api.ApiError as exc:
            assert "already running" in str(exc)
            assert time.monotonic() < deadline, "the dead CLI's capture stayed armed"
            time.sleep(0.2)
    assert started["ring_id"] > 0
    assert api.call(env.sock, "capture.stop", pid=os.getpid()) == {"stopped": os.getpid()}


@pytest.mark.parametrize("flags,named", [
    (["--region", "r9"], "--region"), (["--service", "nope"], "--service"), (["--vm", "vm77"], "--vm"),
    (["--reason", "bad_luck"], "--reason"), (["--verdict", "bounce"], "--verdict"),
    (["--snaplen", "0"], "--snaplen"), (["--snaplen", "4097"], "--snaplen"), (["-c", "0"], "-c"),
    (["--verdict", "pass", "--reason", "no_vm"], "--reason"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(env, flags, named):
    r = env.tb.cmd("gw", [env.daemon.xdpgw, "capture", "--config", env.config_path, *flags, "-w", os.devnull],
                   check=False)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
