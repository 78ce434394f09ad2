"""The Python mirrors must match the C headers exactly: compile the headers
with the system C compiler and compare every struct size and offset and every
constant of ebpf/structs.h (dataplane/structs.py), the -D defaults of
ebpf/defaults.h (dataplane/program.py Sizes) and the pinned map sizes of
ebpf/maps.h (dataplane/pinning.py)."""
import ctypes as ct
import re
import subprocess
from pathlib import Path

import pytest

from dataplane import structs as S
from dataplane.pinning import MAPS_H, PINNED_MAPS, check_reused_maps
from dataplane.program import DEFAULTS_H, PARAMETERS, Sizes


def _run_c(tmp_path: Path, header: Path, prints: list[str]) -> dict[str, int]:
    """Compile a program that includes `header` and runs `prints` (printf lines
    of "name value"); returns name -> value."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include <linux/types.h>',
             f'#include "{header}"', 'int main(void) {', *prints, "return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def _c_layout(tmp_path) -> dict[str, int]:
    prints = []
    for cname, mirror in S.MIRRORS.items():
        prints.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            prints.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    return _run_c(tmp_path, S.STRUCTS_H, prints)


def _c_values(tmp_path, header: Path, names) -> dict[str, int]:
    return _run_c(tmp_path, header, [f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in names])


def test_every_mirror_matches_the_c_header(tmp_path):
    c = _c_layout(tmp_path)
    for cname, mirror in S.MIRRORS.items():
        assert ct.sizeof(mirror) == c[cname], f"sizeof(struct {cname})"
        for field, _ in mirror._fields_:
            assert getattr(mirror, field).offset == c[f"{cname}.{field}"], f"{cname}.{field}"


def test_every_struct_of_the_header_has_a_mirror():
    declared = set(re.findall(r"^struct (\w+) \{", S.STRUCTS_H.read_text(), re.M))
    assert declared == set(S.MIRRORS)


def test_every_constant_matches_the_c_header(tmp_path):
    names = re.findall(r"^#define[ \t]+([A-Z][A-Z0-9_]*)[ \t]+\S", S.STRUCTS_H.read_text(), re.M)
    c = _c_values(tmp_path, S.STRUCTS_H, names)
    for name, value in c.items():
        assert getattr(S, name, None) == value, f"dataplane/structs.py {name} != #define {name} {value}"
    python = {n for n, v in vars(S).items() if n.isupper() and isinstance(v, int)}
    assert python == set(c), "every constant of dataplane/structs.py is a #define of ebpf/structs.h"


def test_sizes_defaults_are_those_of_defaults_h(tmp_path):
    c = _c_values(tmp_path, DEFAULTS_H, [macro for macro, _ in PARAMETERS.values()])
    assert Sizes().defines() == c
    declared = set(re.findall(r"^#ifndef\s+(XDPGW_\w+)\s*$", DEFAULTS_H.read_text(), re.M)) - {"XDPGW_DEFAULTS_H"}
    assert declared == set(c), "every -D default of ebpf/defaults.h is a Sizes field"


def test_every_state_table_is_a_pinned_map():
    assert len(re.findall(r"^STATE_TABLE\(", MAPS_H.read_text(), re.M)) == len(PINNED_MAPS)


def test_pinned_map_sizes_match_the_loaded_program(xdp_program):
    bpf, _, sizes = xdp_program
    check_reused_maps(bpf, sizes)           # raises on any key, value or entries mismatch


def test_constants_come_from_the_header():
    assert S.XDPGW_NO_VM == 0xFFFFFFFF
    assert len(S.DROP_REASONS) == S.DROP_MAX and len(set(S.DROP_REASONS)) == S.DROP_MAX
    assert len(S.STAT_NAMES) == S.STAT_MAX
    assert S.DROP_REASONS[S.DROP_IP4_BAD_IHL] == "ip4_bad_ihl"


@pytest.mark.parametrize("ip,raw", [
    ("198.18.1.2", b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 1, 2])),
    ("2001:db8::1", bytes.fromhex("20010db8000000000000000000000001")),
])
def test_addr16_roundtrip(ip, raw):
    assert bytes(S.addr16(ip)) == raw
    assert str(S.addr_from16(raw)) == ip


def test_bad_mac_names_the_value():
    with pytest.raises(ValueError, match="02:00:zz"):
        S.mac_bytes("02:00:zz:00:00:01")
