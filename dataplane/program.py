"""Compile and load the XDP program through bcc with the configured sizes,
attach it to an interface (native, falling back to generic) and detach it."""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from .structs import EBPF_DIR

ENTRY_FILE = "xdpgw.c"
ENTRY_FUNCTION = "xdpgw_main"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


class LoadError(RuntimeError):
    """The XDP program could not be compiled or loaded (no BPF support, no headers, ...)."""


class AttachError(RuntimeError):
    """XDP could not be attached or detached; the message names the interface."""


@dataclass(frozen=True)
class Sizes:
    """Map sizes and Maglev parameters compiled into the program."""
    flow_entries: int = 65536
    max_services: int = 64
    max_vms: int = 1024
    max_regions: int = 256
    max_prefixes: int = 4096
    max_ports: int = 256
    maglev_m: int = 65537
    hash_seed: int = 0
    new_flow_limit: int = 0           # new flows per CPU per second before flood mode; 0: none
    pin_dir: str | None = None        # where state maps are pinned; None: private maps

    def cflags(self) -> list[str]:
        return [
            f"-DXDPGW_FLOW_ENTRIES={self.flow_entries}", f"-DXDPGW_MAX_SERVICES={self.max_services}",
            f"-DXDPGW_MAX_VMS={self.max_vms}", f"-DXDPGW_MAX_REGIONS={self.max_regions}",
            f"-DXDPGW_MAX_PREFIXES={self.max_prefixes}", f"-DXDPGW_MAX_PORTS={self.max_ports}",
            f"-DXDPGW_MAGLEV_M={self.maglev_m}", f"-DXDPGW_HASH_SEED={self.hash_seed}u",
            f"-DXDPGW_NEW_FLOW_LIMIT={self.new_flow_limit}ull",
        ] + ([f'-DXDPGW_PIN_DIR="{self.pin_dir}"'] if self.pin_dir else [])


def program_source(entry: str = ENTRY_FILE, ebpf_dir: Path = EBPF_DIR) -> str:
    """The entry file with the project's own quoted headers inlined, once each.

    bcc rewrites map calls (`table.lookup(...)`) only in the main file it is
    given, so headers are spliced in here rather than #included by clang.
    """
    seen: set[str] = set()

    def expand(name: str) -> list[str]:
        if name in seen:
            return []
        seen.add(name)
        lines: list[str] = []
        for line in (ebpf_dir / name).read_text().splitlines():
            m = _INCLUDE.match(line)
            lines.extend(expand(m.group(1)) if m else [line])
        return lines

    return "\n".join(expand(entry)) + "\n"


def load(sizes: Sizes):
    """Compile and load; returns (bcc.BPF, program function)."""
    from bcc import BPF  # imported late: importing bcc is slow and needs root for nothing here

    try:
        bpf = BPF(text=program_source().encode(), cflags=sizes.cflags() + ["-Wno-unused-function"])
        fn = bpf.load_func(ENTRY_FUNCTION.encode(), BPF.XDP)
    except Exception as exc:  # bcc raises bare Exceptions; its details went to stderr
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"cannot load the XDP program: {reason} (needs root, bpf() support, and kernel "
                        "headers at /lib/modules/$(uname -r)/build: run `make setup`)") from None
    return bpf, fn


def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise AttachError(f"interface {name!r} does not exist in this network namespace") from None


def attach(fn, interface: str, mode: str = "auto") -> str:
    """Attach to `interface`; returns the mode used ("native" or "generic")."""
    from bcc import BPF

    ifindex(interface)
    modes = ["native", "generic"] if mode == "auto" else [mode]
    errors = []
    for m in modes:
        try:
            BPF.attach_xdp(interface, fn, MODE_FLAGS[m])
            return m
        except Exception as exc:  # bcc raises a bare Exception with the kernel's reason
            errors.append(f"{m}: {exc}")
    raise AttachError(f"cannot attach XDP to interface {interface!r} ({'; '.join(errors)})")


def detach(interface: str, mode: str) -> None:
    from bcc import BPF

    try:
        BPF.remove_xdp(interface, MODE_FLAGS[mode])
    except Exception as exc:
        raise AttachError(f"cannot detach XDP from interface {interface!r}: {exc}") from None


def attached_program_id(interface: str) -> int | None:
    """The id of the XDP program attached to `interface` in this namespace, if any."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifindex(interface))
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if not xdp:
        return None
    return xdp.get_attr("IFLA_XDP_PROG_ID") or None
