#!/usr/bin/env bash
# Set up everything xdpgw needs on a Debian 12 machine, as root. Idempotent: when
# everything is already in place it touches nothing (no apt, no pip) and takes seconds.
#
#   1. Debian packages (bcc, iproute2, bpftool, compilers: gcc, clang for eBPF objects, ...)
#   2. kernel headers for bcc at /lib/modules/$(uname -r)/{build,source}
#   3. .venv made with the Debian python (/usr/bin/python3) and --system-site-packages,
#      so that bcc (python3-bpfcc, in /usr/lib/python3/dist-packages) imports
#   4. pip install -e '.[test,bench]' (builds the Cython extensions and the clang-built
#      eBPF objects in place)
#   5. bpffs mounted at /sys/fs/bpf
#
# Overrides, for tests of this script:
#   XDPGW_MODULES_DIR   modules dir to link headers into (default /lib/modules/$(uname -r))
#   XDPGW_SRC_DIR       where Debian's headers live        (default /usr/src)
#   XDPGW_ONLY=headers  run only the header-linking step (no apt), then exit
#   XDPGW_FORCE_PIP=1   re-run pip even if nothing changed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KVER="$(uname -r)"
ARCH="$(dpkg --print-architecture)"
MODULES_DIR="${XDPGW_MODULES_DIR:-/lib/modules/$KVER}"
SRC_DIR="${XDPGW_SRC_DIR:-/usr/src}"
SYS_PY=/usr/bin/python3
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.xdpgw-install-stamp"
PIP_LOG="$VENV/pip-install.log"

DEB_PACKAGES=(python3-bpfcc python3-venv python3-dev iproute2 ethtool bpftool libbpf1 gcc make tcpdump prometheus systemd
              clang llvm libbpf-dev linux-perf
              etcd-server etcd-client
              openssl)
# Extension modules that must import after the install; read from setup.py below,
# this is the fallback if it can't be parsed.
EXT_MODULES_DEFAULT=(control._maglev dataplane._flowhash dataplane._fold)
# Plain dependencies that must be importable from the venv (checked with find_spec).
PY_DEPS=(bcc pyroute2 scapy numpy pytest hypothesis matplotlib prometheus_client)

step() { printf '==> setup: %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die()  { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------
# kernel headers
# ---------------------------------------------------------------------------------
# A link (or dir) is "correct" when it resolves to an existing directory.
header_links_ok() {
    [[ -d "$MODULES_DIR/build" && -d "$MODULES_DIR/source" ]]
}

deb_installed() {  # deb_installed PKG -> 0 if installed
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

# Newest Debian arch header dir under $SRC_DIR whose -common sibling exists.
newest_distro_headers() {
    local d common
    while read -r d; do
        common="${d%-"$ARCH"}-common"
        if [[ -d "$d" && -d "$common" ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done < <(compgen -G "$SRC_DIR/linux-headers-*-$ARCH" | sort -rV)
    return 1
}

# Point $MODULES_DIR/{build,source} at the newest distro headers; keeps correct
# entries, replaces dangling links.
link_headers() {
    if header_links_ok; then
        info "headers: $MODULES_DIR/build -> $(readlink -f "$MODULES_DIR/build")"
        return 0
    fi
    local build common name target
    if [[ -d "$MODULES_DIR/build" ]]; then
        # keep a working build link; pair source with its -common sibling if it has one
        build="$(readlink -f "$MODULES_DIR/build")"
        common="${build%-"$ARCH"}-common"
    fi
    if [[ -z "${common:-}" || ! -d "$common" ]]; then
        build="$(newest_distro_headers)" \
            || die "no $SRC_DIR/linux-headers-*-$ARCH with a matching -common dir (is linux-headers-$ARCH installed?)"
        common="${build%-"$ARCH"}-common"
    fi
    mkdir -p "$MODULES_DIR" || die "cannot create $MODULES_DIR"
    for name in build source; do
        [[ "$name" == build ]] && target="$build" || target="$common"
        if [[ -d "$MODULES_DIR/$name" ]]; then
            continue  # already resolves to a directory: leave it alone
        fi
        if [[ -e "$MODULES_DIR/$name" && ! -L "$MODULES_DIR/$name" ]]; then
            die "$MODULES_DIR/$name exists and is not a directory or link; remove it"
        fi
        ln -sfn "$target" "$MODULES_DIR/$name" || die "cannot link $MODULES_DIR/$name -> $target"
        info "headers: linked $MODULES_DIR/$name -> $target"
    done
    header_links_ok || die "kernel headers at $MODULES_DIR/{build,source} are still not usable"
}

if [[ "${XDPGW_ONLY:-}" == headers ]]; then
    step "kernel headers only ($MODULES_DIR)"
    link_headers
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get, /lib/modules, mount bpffs)"

# ---------------------------------------------------------------------------------
# 1+2. Debian packages, including kernel headers
# ---------------------------------------------------------------------------------
step "1/5 Debian packages"
missing=()
for p in "${DEB_PACKAGES[@]}"; do
    deb_installed "$p" || missing+=("$p")
done

# Headers are needed from apt only if bcc can't already find them and no header
# package we could link from is installed.
need_headers=0
if ! header_links_ok && ! deb_installed "linux-headers-$KVER"; then
    if ! deb_installed "linux-headers-$ARCH" || ! newest_distro_headers >/dev/null; then
        need_headers=1
    fi
fi

if (( ${#missing[@]} > 0 || need_headers )); then
    export DEBIAN_FRONTEND=noninteractive
    info "missing: ${missing[*]:-}$( (( need_headers )) && printf ' (kernel headers)')"
    apt_log="$(mktemp /tmp/xdpgw-setup-apt.XXXXXX.log)"
    info "apt-get update (log: $apt_log)"
    if ! apt-get update >"$apt_log" 2>&1; then
        tail -n 30 "$apt_log" >&2
        die "apt-get update failed (log: $apt_log)"
    fi
    if (( need_headers )); then
        # A stock Debian kernel has its own headers package; a custom kernel has none,
        # then the newest distro headers (linked below) serve bcc's XDP programs.
        if apt-cache policy "linux-headers-$KVER" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            missing+=("linux-headers-$KVER")
        else
            info "no linux-headers-$KVER package; using linux-headers-$ARCH"
            missing+=("linux-headers-$ARCH")
        fi
    fi
    info "apt-get install ${missing[*]}"
    # Debian's prometheus and etcd-server packages (the tests start their own servers)
    # would start and enable a service: no service starts during the install (a
    # policy-rc.d of our own, unless the host has one), and their units disabled after.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    apt_rc=0
    apt-get install -y --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 || apt_rc=$?
    (( own_policy )) && rm -f /usr/sbin/policy-rc.d
    if (( apt_rc != 0 )); then
        tail -n 30 "$apt_log" >&2
        die "apt-get install failed for: ${missing[*]} (log: $apt_log)"
    fi
    for unit in prometheus:prometheus etcd-server:etcd; do
        if [[ " ${missing[*]} " == *" ${unit%%:*} "* ]] && command -v systemctl >/dev/null; then
            systemctl disable --now "${unit#*:}.service" >>"$apt_log" 2>&1 || true
        fi
    done
    rm -f "$apt_log"
else
    info "all present"
fi

step "2/5 kernel headers for bcc ($MODULES_DIR/{build,source})"
link_headers

# ---------------------------------------------------------------------------------
# 3. virtual environment
# ---------------------------------------------------------------------------------
step "3/5 virtual environment .venv (Debian python, system site-packages)"
[[ -x "$SYS_PY" ]] || die "$SYS_PY not found (python3 package missing?)"

venv_ok() {
    [[ -x "$VPY" && -f "$VENV/pyvenv.cfg" ]] || return 1
    grep -Eq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" || return 1
    # made with the Debian python? (its interpreter resolves to the same file)
    [[ "$(readlink -f "$VPY")" == "$(readlink -f "$SYS_PY")" ]] || return 1
    "$VPY" -c 'import bcc' >/dev/null 2>&1
}

if venv_ok; then
    info "ok ($("$VPY" -V 2>&1))"
else
    if [[ -e "$VENV" ]]; then
        info "existing .venv is not usable (other python, no system site-packages or no bcc): recreating"
        rm -rf "$VENV"
    fi
    "$SYS_PY" -m venv --system-site-packages "$VENV" \
        || die "cannot create .venv with $SYS_PY -m venv (is python3-venv installed?)"
    "$VPY" -c 'import bcc' \
        || die ".venv/bin/python cannot 'import bcc' (python3-bpfcc not in /usr/lib/python3/dist-packages?)"
    info "created with $("$VPY" -V 2>&1)"
fi

# ---------------------------------------------------------------------------------
# 4. pip install -e '.[test,bench]'
# ---------------------------------------------------------------------------------
step "4/5 pip install -e '.[test,bench]' (Cython extensions, eBPF objects)"

inputs_hash() {
    local files=(pyproject.toml setup.py)
    shopt -s nullglob
    files+=(cython/*.pyx cython/*.pxd ebpf/*.bpf.c)
    shopt -u nullglob
    sha256sum "${files[@]}" | sha256sum | cut -d' ' -f1
}

ext_modules() {  # module names of the Extension(...) entries in setup.py
    "$VPY" - "$ROOT/setup.py" <<'EOF' 2>/dev/null || printf '%s\n' "${EXT_MODULES_DEFAULT[@]}"
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
names = [n.args[0].value for n in ast.walk(tree)
         if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "Extension"
         and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)]
if not names:
    sys.exit(1)
print("\n".join(names))
EOF
}

mapfile -t EXT_MODULES < <(ext_modules)

# Imports the extensions for real (from /, so it's the install, not the cwd, that
# provides them) and checks the plain dependencies are there.
install_ok() {
    [[ -x "$VENV/bin/xdpgw" ]] || { info "no .venv/bin/xdpgw"; return 1; }
    (cd / && "$VPY" - "${EXT_MODULES[@]}" <<EOF
import importlib, importlib.util, sys
bad = [m for m in "${PY_DEPS[*]}".split() if importlib.util.find_spec(m) is None]
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m} ({type(e).__name__}: {e})")
from dataplane.elemcount import OBJECT
if not OBJECT.exists():
    bad.append(f"{OBJECT} (built by setup.py with clang)")
if bad:
    print("    missing or not importable: " + ", ".join(bad))
    sys.exit(1)
EOF
    )
}

want="$(inputs_hash)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "${XDPGW_FORCE_PIP:-0}" != 1 && "$want" == "$have" ]] && install_ok; then
    info "up to date (${EXT_MODULES[*]} import)"
else
    if [[ -z "$have" ]]; then
        info "not installed yet (no stamp)"
    elif [[ "$want" != "$have" ]]; then
        info "inputs changed (pyproject.toml, setup.py, cython/*.pyx, ebpf/*.bpf.c)"
    fi
    info "installing; log in .venv/pip-install.log (takes a minute when building from scratch)"
    rm -f "$STAMP"
    # Build in the venv itself (no isolated build env): faster rebuilds when a .pyx
    # changes, and the extensions are compiled against the numpy they run with.
    reqs_txt="$("$VPY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')" \
        || die "cannot read [build-system] requires from pyproject.toml"
    mapfile -t build_reqs <<<"$reqs_txt"
    if ! "$VPY" -m pip install "${build_reqs[@]}" >"$PIP_LOG" 2>&1; then
        grep -v "^WARNING: Location 'file://.*' is ignored" "$PIP_LOG" | tail -n 40 >&2
        die "pip install of the build requirements (${build_reqs[*]}) failed (full log: $PIP_LOG)"
    fi
    if ! "$VPY" -m pip install --no-build-isolation -e '.[test,bench]' >>"$PIP_LOG" 2>&1; then
        grep -v "^WARNING: Location 'file://.*' is ignored" "$PIP_LOG" | tail -n 40 >&2
        die "pip install -e '.[test,bench]' failed (full log: $PIP_LOG)"
    fi
    if ! install_ok; then
        die "pip install succeeded but the install is incomplete (extensions ${EXT_MODULES[*]} must import; log: $PIP_LOG)"
    fi
    printf '%s\n' "$want" >"$STAMP"
    info "installed (${EXT_MODULES[*]} import)"
fi

# ---------------------------------------------------------------------------------
# 5. bpffs
# ---------------------------------------------------------------------------------
step "5/5 bpffs at /sys/fs/bpf"
bpffs_mounted() { awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; }
if bpffs_mounted; then
    info "mounted"
else
    [[ -d /sys/fs/bpf ]] || mkdir -p /sys/fs/bpf 2>/dev/null || die "/sys/fs/bpf does not exist and cannot be created"
    mount -t bpf bpf /sys/fs/bpf || die "mount -t bpf bpf /sys/fs/bpf failed"
    info "mounted now"
fi

step "done"
