"""Running under systemd: the unit files (package data beside this module), the
`xdpgw install-service` command that puts them in place, and the readiness
notification a Type=notify unit waits for."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from importlib import resources
from pathlib import Path

GATEWAY_UNIT = "xdpgw@.service"
CENTER_UNIT = "xdpgw-center@.service"
UNIT_DIR = "etc/systemd/system"
CONFIG_DIR = "etc/xdpgw"
EXECUTABLE = "@XDPGW@"          # the placeholder in the unit files


class InstallError(ValueError):
    """`install-service` cannot do what was asked; the message names the option."""


def unit_text(unit: str, executable: str) -> str:
    """A unit file of the package with the xdpgw executable's path filled in."""
    return resources.files(__package__).joinpath(unit).read_text().replace(EXECUTABLE, executable)


def this_executable() -> str:
    """The absolute path of the `xdpgw` being run (a console script), else PATH's."""
    here = Path(sys.argv[0])
    if here.name == "xdpgw" and here.exists():
        return str(here.absolute())
    found = shutil.which("xdpgw")
    if found is None:
        raise InstallError("cannot find the xdpgw executable; give --bin PATH")
    return str(Path(found).absolute())


def install_units(center: bool = False, name: str | None = None, root: str = "/",
                  executable: str | None = None) -> list[str]:
    """Write the gateway's (or the center's) unit file under `root`/etc/systemd/system,
    make `root`/etc/xdpgw (root-only: configs hold tokens), and return what to tell
    the operator: the file written and the systemctl commands. Idempotent."""
    unit = CENTER_UNIT if center else GATEWAY_UNIT
    name = name or ("center" if center else "xdpgw")
    if not name or "/" in name or name.startswith("."):
        raise InstallError(f"--name {name!r}: give an instance name such as gw1")
    executable = executable or this_executable()
    if not (os.path.isabs(executable) and os.access(executable, os.X_OK)):
        raise InstallError(f"--bin {executable!r}: not an executable absolute path")
    base = Path(root)
    target = base / UNIT_DIR / unit
    text = unit_text(unit, executable)
    target.parent.mkdir(parents=True, exist_ok=True)
    (base / CONFIG_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    unchanged = target.exists() and target.read_text() == text
    if not unchanged:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    instance = f"{unit.split('@')[0]}@{name}"
    config = Path("/") / CONFIG_DIR / f"{name}.toml"
    lines = [f"{target}: {'unchanged' if unchanged else 'written'} (runs {executable})"]
    if not (base / CONFIG_DIR / f"{name}.toml").exists():
        lines.append(f"write {config} first" + ("" if center else f" (check it: xdpgw check --config {config})"))
    lines += ["systemctl daemon-reload", f"systemctl enable --now {instance}"]
    if not center:
        lines += [f"systemctl reload {instance}    # after editing {config}",
                  f"systemctl kill --kill-whom=main -s SIGUSR2 {instance}    # upgrade: the restart takes over"]
    return lines


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about the service, e.g. "READY=1"; nothing outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):                     # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)
