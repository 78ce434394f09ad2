"""Config and start-up errors: one line naming the key or the cause,
exit code 2, and nothing loaded or attached."""
from __future__ import annotations

import pytest

from control import cli
from dataplane.program import LoadError, Sizes, load
from tests.configs import MINIMAL


def _run(tmp_path, capsys, text: str, *args: str) -> tuple[int, list[str]]:
    path = tmp_path / "xdpgw.toml"
    path.write_text(text)
    rc = cli.main(["run", "--config", str(path), *args])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("change,needle", [
    (lambda t: t + '\n[[vm]]\nname = "vm1"\nport = "lo"\nmac = "02:00:00:00:00:02"\n', 'duplicate'),
    (lambda t: t.replace('vms = ["vm1"]', 'vms = ["vm1", "vm7"]'), 'unknown VM "vm7"'),
    (lambda t: t.replace('"198.18.1.0/24"', '"198.18.1.0/33"'), "region[0].prefixes"),
    (lambda t: t.replace('mac = "02:00:00:00:00:01"', 'mac = "02:00:00:00:01"'), "vm[0].mac"),
    (lambda t: t.replace("port = 8080\n", ""), "service[0].port"),
    (lambda t: t.replace('interface = "lo"', 'interfac = "lo"'), "gateway.interfac"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, change, needle):
    rc, lines = _run(tmp_path, capsys, change(MINIMAL))
    assert rc == 2 and len(lines) == 1, lines
    assert needle in lines[0] and lines[0].startswith("xdpgw: ")


def test_running_without_root_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    rc, lines = _run(tmp_path, capsys, MINIMAL)
    assert rc == 2 and lines == ["xdpgw: xdpgw run must run as root (it loads BPF programs and attaches XDP)"]


def test_a_program_that_cannot_load_is_one_clear_error():
    with pytest.raises(LoadError) as info:
        load(Sizes(flow_entries=0))               # the kernel refuses a map without entries
    text = str(info.value)
    assert "\n" not in text and text.startswith("cannot load the XDP program:") and "make setup" in text
