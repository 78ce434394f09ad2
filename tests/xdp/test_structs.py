"""The Python mirror (dataplane/structs.py) must match ebpf/structs.h exactly:
compile the header with the system C compiler and compare every size and offset."""
import ctypes as ct
import subprocess

import pytest

from dataplane import structs as S


def _c_layout(tmp_path) -> dict[str, int]:
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include <linux/types.h>',
             f'#include "{S.STRUCTS_H}"', 'int main(void) {']
    for cname, mirror in S.MIRRORS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_mirror_matches_the_c_header(tmp_path):
    c = _c_layout(tmp_path)
    for cname, mirror in S.MIRRORS.items():
        assert ct.sizeof(mirror) == c[cname], f"sizeof(struct {cname})"
        for field, _ in mirror._fields_:
            assert getattr(mirror, field).offset == c[f"{cname}.{field}"], f"{cname}.{field}"


def test_every_struct_of_the_header_has_a_mirror():
    import re
    declared = set(re.findall(r"^struct (\w+) \{", S.STRUCTS_H.read_text(), re.M))
    assert declared == set(S.MIRRORS)


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
