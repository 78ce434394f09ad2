"""A persistent child process inside a network namespace, serving calls.

testbed.netns.run_in_netns runs one function in a forked child and returns;
the gateway of the end-to-end benchmark has to live on between calls (its
maps, its attached program), so this child stays, entered into the namespace,
and runs the functions it is asked to by name. Functions and state live in
the forked copy of this process; arguments and results are pickled over pipes.

The child is ours: it dies with us (PR_SET_PDEATHSIG), and `close()` ends it,
by its pid, with SIGKILL if it does not exit in time."""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import struct
import time
import traceback
from typing import Any, Callable

from dataplane.netns import enter_netns

PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    pass


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = b""
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("worker did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("worker pipe closed")
        buf += chunk
    return buf


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    view = memoryview(struct.pack("!Q", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv(fd: int, deadline: float | None) -> Any:
    (n,) = struct.unpack("!Q", _read_exact(fd, 8, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


class NsWorker:
    def __init__(self, netns: str, functions: dict[str, Callable[..., Any]], start_timeout: float = 30.0) -> None:
        self.netns = netns
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != parent_pid:
                    os._exit(1)
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C
                enter_netns(netns)
                _send(rep_w, ("ready", os.getpid()))
                while True:
                    try:
                        name, args, kwargs = _recv(req_r, None)
                    except EOFError:
                        break
                    if name == "__exit__":
                        _send(rep_w, ("ok", None))
                        break
                    try:
                        _send(rep_w, ("ok", functions[name](*args, **kwargs)))
                    except BaseException as exc:  # noqa: BLE001 - shipped to the parent
                        try:
                            _send(rep_w, ("err", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                        except BaseException:  # noqa: BLE001
                            _send(rep_w, ("err", repr(exc), ""))
            except BaseException:  # noqa: BLE001
                status = 1
            finally:
                os._exit(status)
        os.close(req_r)
        os.close(rep_w)
        self.pid = pid
        self._req = req_w
        self._rep = rep_r
        try:
            msg = _recv(self._rep, time.monotonic() + start_timeout)
            if msg[0] != "ready":
                raise WorkerError(f"worker in {netns} did not start: {msg}")
        except BaseException:
            self.close(0)
            raise

    def call(self, name: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        self.submit(name, *args, **kwargs)
        return self.result(name, timeout)

    def submit(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Start a call without waiting (workers run side by side); `result` collects it."""
        if self.pid is None:
            raise WorkerError("worker is closed")
        _send(self._req, (name, args, kwargs))

    def result(self, name: str, timeout: float = 120.0) -> Any:
        try:
            msg = _recv(self._rep, time.monotonic() + timeout)
        except (TimeoutError, EOFError) as exc:
            self.close(0)
            raise WorkerError(f"worker in {self.netns}: {name} failed: {exc}") from None
        if msg[0] == "ok":
            return msg[1]
        raise WorkerError(f"worker in {self.netns}: {name}: {msg[1]}\n{msg[2]}")

    def close(self, grace: float = 10.0) -> None:
        """Ask the child to exit; kill it (by its pid) if it has not after `grace` seconds."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            if grace > 0:
                try:
                    _send(self._req, ("__exit__", (), {}))
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while True:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        finally:
            for fd in (self._req, self._rep):
                try:
                    os.close(fd)
                except OSError:
                    pass
