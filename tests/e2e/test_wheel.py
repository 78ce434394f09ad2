"""Installed as a new user would: `pip wheel .`, the wheel installed into a fresh
venv (system site-packages, for bcc), run from outside the checkout. The installed
`xdpgw` validates a config, lists the testbed's commands (its entry point), and
its XDP program, compiled from the wheel's own eBPF sources, passes a frame
untouched and drops a malformed one with its reason counted once; the flow table
is counted by the wheel's clang-built iterator object."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.configs import MINIMAL

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"        # Debian's, whose dist-packages hold bcc
# What a source distribution carries: the packages, the Cython sources, the build files.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "ebpf", "cython", "dataplane", "control", "testbed")


# Runs inside the new venv: the program from the installed package, one frame
# for no VIP (PASS, bytes unchanged) and one truncated IPv4 header (DROP, ip4_trunc +1).
PROBE = r"""
import json, struct
import dataplane, ebpf
from dataplane.maps import Dataplane
from dataplane.program import Sizes, load
from dataplane.testrun import TestRunner

sizes = Sizes(flow_entries=1024)
bpf, fn = load(sizes)
dp = Dataplane(bpf, sizes)
tr = TestRunner(dp, fn.fd)
eth = bytes.fromhex("020000000301" "020000000302") + struct.pack("!H", 0x0800)
ip = bytes.fromhex("4500001c000100004011" "0000" "c6120105" "c6120206")   # 198.18.1.5 -> 198.18.2.6, UDP
udp = struct.pack("!HHHH", 1000, 2000, 8, 0)
passed = tr.run(eth + ip + udp)
before = dp.drop_counters()["ip4_trunc"]
dropped = tr.run(eth + ip[:19])
print(json.dumps({"dataplane": dataplane.__file__, "ebpf": ebpf.__file__,
                  "pass": [passed.verdict, passed.data == eth + ip + udp],
                  "drop": [dropped.verdict, dp.drop_counters()["ip4_trunc"] - before],
                  "flows": dp.flow_count(walk=False)}))
"""


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.c.cache"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    # The checkout's venv has the build requirements: build without network isolation.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                  str(src)], timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheels = list((tmp / "dist").glob("xdpgw-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    made = _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(env_dir)], timeout=120)
    assert made.returncode == 0, made.stderr
    installed = _run([str(env_dir / "bin" / "pip"), "install", "--quiet", str(wheels[0])], timeout=900)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return env_dir


def _outside(env_dir: Path) -> dict:
    """Run from a directory that is not the checkout, so nothing is imported from it."""
    return {"cwd": str(env_dir), "env": {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}}


def test_installed_cli_checks_a_config(venv, tmp_path):
    config = tmp_path / "wheel.toml"
    config.write_text(MINIMAL)
    ok = _run([str(venv / "bin" / "xdpgw"), "check", "--config", str(config)], timeout=120, **_outside(venv))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{config}: ok (1 regions, 1 services, 1 VMs)"
    config.write_text(MINIMAL.replace('port = 8080', 'port = 80800'))
    bad = _run([str(venv / "bin" / "xdpgw"), "check", "--config", str(config)], timeout=120, **_outside(venv))
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "service[0].port" in bad.stderr, bad.stderr


def test_installed_cli_has_the_testbed_commands(venv):
    out = _run([str(venv / "bin" / "xdpgw"), "--help"], timeout=120, **_outside(venv))
    assert out.returncode == 0, out.stderr
    assert "testbed" in out.stdout and "demo" in out.stdout


def test_installed_program_runs(venv):
    out = _run([str(venv / "bin" / "python"), "-c", PROBE], timeout=300, **_outside(venv))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dataplane"].startswith(str(venv)) and result["ebpf"].startswith(str(venv)), result
    assert result["pass"] == ["PASS", True]
    assert result["drop"] == ["DROP", 1]
    assert result["flows"] == 0      # None: the iterator object is missing or did not load


def test_installed_cli_writes_its_systemd_units(venv, tmp_path):
    """The wheel carries the unit files; the installed xdpgw writes them naming itself."""
    xdpgw = str(venv / "bin" / "xdpgw")
    for extra, unit in (([], "xdpgw@.service"), (["--center"], "xdpgw-center@.service")):
        out = _run([xdpgw, "install-service", "--root", str(tmp_path), *extra], timeout=120, **_outside(venv))
        assert out.returncode == 0, out.stderr
        text = (tmp_path / "etc/systemd/system" / unit).read_text()
        assert f"ExecStart={xdpgw} " in text and "@XDPGW@" not in text
    if shutil.which("systemd-analyze"):
        verify = _run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "etc/systemd/system/xdpgw@gw1.service")],
                      timeout=120)
        assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
