"""Run code inside a named network namespace.

Three tools, from cheapest to most isolated:

* ``netns_socket(name, ...)`` -- a socket that lives in ``name`` but is used from
  this process (a forked child creates it and passes the fd back).
* ``run_in_netns(name, func, *args)`` -- run a picklable-result callable in a forked
  child that ``setns()``-ed into ``name``; the result or exception comes back.
* ``popen_in_netns(name, argv)`` -- ``ip netns exec`` a command.  Use this for code
  that reads ``/sys`` (``ip netns exec`` remounts it for the namespace; a forked
  child still sees the parent's ``/sys``) or imports scapy (which caches the
  interface list at import time).

The forked children switch with ``dataplane.netns.enter_netns`` (only in a child:
the parent would stay switched).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import time
import traceback
from typing import Any, Callable, Sequence

from dataplane.netns import enter_netns

NETNS_RUN_DIR = "/var/run/netns"


class NetnsError(RuntimeError):
    """The callable raised an exception inside the namespace child."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nobody listens on (bound, then released) in this process's network namespace."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(fd: int, deadline: float) -> bytes:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("namespace child did not finish in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _reap(pid: int, deadline: float) -> None:
    """Wait for the child; kill it (by pid: it is ours) if it overstays."""
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.005)


def run_in_netns(name: str, func: Callable[..., Any], *args: Any,
                 timeout: float = 30.0, **kwargs: Any) -> Any:
    """Call ``func(*args, **kwargs)`` in a child that has entered netns ``name``.

    The return value is pickled back through a pipe; an exception in the child is
    re-raised here (the original type if it unpickles, else ``NetnsError``).
    The child is killed (by its pid) after ``timeout`` seconds.
    """
    if not netns_exists(name):
        raise FileNotFoundError(f"network namespace {name!r} does not exist")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack (pytest, etc.)
        status = 0
        try:
            os.close(rfd)
            try:
                enter_netns(name)
                payload = ("ok", func(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - shipped to parent
                payload = ("err", exc, traceback.format_exc())
            try:
                data = pickle.dumps(payload)
            except Exception as exc:  # result or exception not picklable
                data = pickle.dumps(("err", None, f"unpicklable result: {exc!r}\n"
                                     + (payload[2] if payload[0] == "err" else "")))
            view = memoryview(data)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    try:
        data = _read_all(rfd, deadline)
    except TimeoutError:
        os.close(rfd)
        _reap(pid, 0)  # overdue: kill now
        raise TimeoutError(f"run_in_netns({name!r}, {getattr(func, '__name__', func)})"
                           f" exceeded {timeout}s") from None
    os.close(rfd)
    _reap(pid, deadline + 1.0)
    if not data:
        raise NetnsError(f"namespace child for {name!r} died without a result")
    payload = pickle.loads(data)
    if payload[0] == "ok":
        return payload[1]
    _, exc, tb = payload
    if isinstance(exc, BaseException):
        # keep the child's traceback visible: it is the useful one
        exc.add_note(f"(raised in netns {name!r})\n{tb}")
        raise exc
    raise NetnsError(f"error in netns {name!r}", tb)


def netns_socket(name: str, family: int = socket.AF_INET,
                 sock_type: int = socket.SOCK_DGRAM, proto: int = 0,
                 timeout: float = 10.0) -> socket.socket:
    """A socket created inside netns ``name``, usable from this process.

    A socket stays in the namespace it was created in, so the child only has to
    create it and hand the fd over (SCM_RIGHTS); bind/connect/send happen here.
    """
    if not netns_exists(name):
        raise FileNotFoundError(f"network namespace {name!r} does not exist")
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            parent_end.close()
            enter_netns(name)
            s = socket.socket(family, sock_type, proto)
            socket.send_fds(child_end, [b"ok"], [s.fileno()])
            status = 0
        except BaseException as exc:  # noqa: BLE001
            try:
                child_end.send(b"err:" + repr(exc).encode())
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(status)
    child_end.close()
    try:
        parent_end.settimeout(timeout)
        msg, fds, _, _ = socket.recv_fds(parent_end, 1024, 1)
    finally:
        parent_end.close()
        _reap(pid, time.monotonic() + timeout)
    if not fds:
        raise NetnsError(f"could not create socket in {name!r}: {msg.decode(errors='replace')}")
    return socket.socket(family, sock_type, proto, fileno=fds[0])


def netns_argv(name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def popen_in_netns(name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of ``argv`` under ``ip netns exec name``.

    The caller owns the process: terminate/kill it by ``proc.pid`` when done.
    """
    return subprocess.Popen(netns_argv(name, argv), **kw)


def run_cmd_in_netns(name: str, argv: Sequence[str], timeout: float = 30.0,
                     check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in netns ``name`` to completion (bounded by ``timeout``)."""
    return subprocess.run(netns_argv(name, argv), capture_output=True, text=True,
                          timeout=timeout, check=check)
