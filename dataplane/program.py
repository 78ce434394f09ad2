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
DEFAULTS_H = EBPF_DIR / "defaults.h"
TEST_TRACE = "XDPGW_TEST_TRACE"       # -D of the test build: the forward trace (ebpf/trace.h)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')
_DEFINE = re.compile(r"^#define[ \t]+([A-Z][A-Z0-9_]*)[ \t]+(\d+)\b", re.M)


class LoadError(RuntimeError):
    """The XDP program could not be compiled or loaded (no BPF support, no headers, ...)."""


class AttachError(RuntimeError):
    """XDP could not be attached or detached; the message names the interface."""


# Sizes field -> the -D parameter of ebpf/defaults.h it sets, with the C suffix of its type.
PARAMETERS = {
    "flow_entries": ("XDPGW_FLOW_ENTRIES", ""), "max_services": ("XDPGW_MAX_SERVICES", ""),
    "max_vms": ("XDPGW_MAX_VMS", ""), "max_regions": ("XDPGW_MAX_REGIONS", ""),
    "max_prefixes": ("XDPGW_MAX_PREFIXES", ""), "max_ports": ("XDPGW_MAX_PORTS", ""),
    "maglev_m": ("XDPGW_MAGLEV_M", ""), "hash_seed": ("XDPGW_HASH_SEED", "u"),
    "new_flow_limit": ("XDPGW_NEW_FLOW_LIMIT", "ull"),
}
_DEFAULTS = {name: int(value) for name, value in _DEFINE.findall(DEFAULTS_H.read_text())}


def _default(field: str) -> int:
    return _DEFAULTS[PARAMETERS[field][0]]


@dataclass(frozen=True)
class Sizes:
    """Map sizes and Maglev parameters compiled into the program; the defaults
    are those of ebpf/defaults.h."""
    flow_entries: int = _default("flow_entries")
    max_services: int = _default("max_services")
    max_vms: int = _default("max_vms")
    max_regions: int = _default("max_regions")
    max_prefixes: int = _default("max_prefixes")
    max_ports: int = _default("max_ports")
    maglev_m: int = _default("maglev_m")
    hash_seed: int = _default("hash_seed")
    new_flow_limit: int = _default("new_flow_limit")  # new flows per CPU per second before flood mode; 0: none
    pin_dir: str | None = None        # where state maps are pinned; None: private maps

    def defines(self) -> dict[str, int]:
        """The value of each -D parameter (XDPGW_FLOW_ENTRIES: 65536, ...)."""
        return {macro: getattr(self, field) for field, (macro, _) in PARAMETERS.items()}

    def cflags(self) -> list[str]:
        return [f"-D{macro}={getattr(self, field)}{suffix}" for field, (macro, suffix) in PARAMETERS.items()] + \
            ([f'-DXDPGW_PIN_DIR="{self.pin_dir}"'] if self.pin_dir else [])


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


def load(sizes: Sizes | None = None, entry: str = ENTRY_FILE, function: str = ENTRY_FUNCTION, *,
         trace: bool = False):
    """Compile `entry` (with `sizes` as -D flags, if given) and load its XDP
    `function`; returns (bcc.BPF, program function). `trace`: the test build,
    which records every forwarded packet (Dataplane.last_forward)."""
    from bcc import BPF  # imported late: importing bcc is slow and needs root for nothing here

    try:
        bpf = BPF(text=program_source(entry).encode(),
                  cflags=(sizes.cflags() if sizes else []) + ["-Wno-unused-function"]
                  + ([f"-D{TEST_TRACE}"] if trace else []))
        fn = bpf.load_func(function.encode(), BPF.XDP)
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
