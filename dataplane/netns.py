"""Joining a named network namespace (Python 3.11 has no os.setns: pyroute2's
setns calls libc setns(2))."""
from __future__ import annotations

from pyroute2.netns import setns


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name`; OSError if there is none.

    Only the network namespace: the mount namespace, and with it the host's
    /sys/fs/bpf, stays. Call it before any thread starts: setns() moves only the
    calling thread, and new threads inherit its namespace. flags=0 because
    pyroute2's default (O_CREAT) would silently create a missing namespace."""
    setns(name, flags=0)
