"""`xdpgw install-service`: the unit files it writes into a temporary root (exactly
those, with the real executable's path), which systemd's own parser accepts;
the logs' one-line key=value format; readiness notification to systemd."""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from control.deploy import CENTER_UNIT, GATEWAY_UNIT, notify, unit_text
from control.logs import KeyValueFormatter, event

XDPGW = str(Path(sys.executable).with_name("xdpgw"))


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([XDPGW, "install-service", "--root", str(root), *args], capture_output=True, text=True,
                          timeout=60)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def test_install_service_writes_exactly_the_units(tmp_path):
    r = install(tmp_path, "--name", "gw1")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system" / GATEWAY_UNIT
    assert files_under(tmp_path) == {"etc/", "etc/systemd/", "etc/systemd/system/", "etc/xdpgw/",
                                     f"etc/systemd/system/{GATEWAY_UNIT}"}
    text = unit.read_text()
    assert text == unit_text(GATEWAY_UNIT, XDPGW) and "@XDPGW@" not in text
    assert f"ExecStart={XDPGW} run --config /etc/xdpgw/%i.toml" in text
    assert (tmp_path / "etc/xdpgw").stat().st_mode & 0o777 == 0o700
    assert "systemctl daemon-reload" in r.stdout and "systemctl enable --now xdpgw@gw1" in r.stdout
    assert "write /etc/xdpgw/gw1.toml first" in r.stdout

    again = install(tmp_path, "--name", "gw1")                      # idempotent
    assert again.returncode == 0 and "unchanged" in again.stdout and unit.read_text() == text

    r = install(tmp_path, "--center")
    assert r.returncode == 0, r.stderr
    assert f"ExecStart={XDPGW} center --config /etc/xdpgw/%i.toml" in \
        (tmp_path / "etc/systemd/system" / CENTER_UNIT).read_text()
    assert "systemctl enable --now xdpgw-center@center" in r.stdout


def test_install_service_refuses_bad_options_in_one_line(tmp_path):
    for args, needle in ((("--bin", "relative/xdpgw"), "--bin"), (("--name", "a/b"), "--name")):
        r = install(tmp_path, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "etc/systemd/system" / GATEWAY_UNIT).exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian systemd) not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    assert install(tmp_path).returncode == 0 and install(tmp_path, "--center").returncode == 0
    units = tmp_path / "etc/systemd/system"
    for instance in ("xdpgw@gw1.service", "xdpgw-center@center.service"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / instance)],
                           capture_output=True, text=True, timeout=120)
        # an unknown key or a bad value is only a warning: nothing may be printed at all
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_event_is_one_key_value_line():
    record = logging.getLogger("xdpgw.test").makeRecord("xdpgw.test", logging.INFO, __file__, 1, "vm.moved", (),
                                                         None)
    record.event_fields = {"vm": "vm1", "from": "gwv1", "to": "gwv2", "ms": 3.1, "detail": 'a "b" c', "none": None}
    line = KeyValueFormatter(timestamps=False).format(record)
    assert line == 'level=info event=vm.moved vm=vm1 from=gwv1 to=gwv2 ms=3.1 detail="a \\"b\\" c" none=-'


def test_event_goes_through_logging(caplog):
    with caplog.at_level(logging.INFO):
        event(logging.getLogger("xdpgw.test"), "config.reloaded", logging.INFO, vms_added="vm4")
    line = KeyValueFormatter().format(caplog.records[-1])
    assert line.startswith("ts=") and line.endswith(" level=info event=config.reloaded vms_added=vm4")


def test_notify_sends_the_state_to_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notify("READY=1")
        assert s.recv(64) == b"READY=1"
