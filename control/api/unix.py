"""The local control API: one JSON request per line over a root-only unix
socket, one JSON reply per line. Malformed requests get an error reply; they
never take the daemon down."""
from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from typing import Any, Callable

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Any]


class ApiError(RuntimeError):
    """The daemon answered with an error, or could not be reached."""


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST + 1)
        reply = self.server.dispatch(line)          # type: ignore[attr-defined]
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, commands: dict[str, Handler]) -> None:
        self.commands = commands
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)                       # the socket is created 0600: root only
        try:
            super().__init__(path, _RequestHandler)
        finally:
            os.umask(old)
        self.path = path
        self.thread = threading.Thread(target=self.serve_forever, name="xdpgw-api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"malformed JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a string "cmd"'}
        args = request.get("args", {})
        if not isinstance(args, dict):
            return {"ok": False, "error": '"args" must be an object'}
        handler = self.commands.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}; known: {sorted(self.commands)}"}
        try:
            return {"ok": True, "result": handler(args)}
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
            # KeyError's str() is the repr of its argument: use the argument itself;
            # stripping quotes from str() would eat the closing quote of "unknown VM 'x'"
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            return {"ok": False, "error": str(message)}


def call(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request to the daemon at `path` and return its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApiError(f"no xdpgw daemon is listening on {path} (start it with `xdpgw run`)") from None
        except PermissionError:
            raise ApiError(f"permission denied on {path}: the control API is root-only") from None
        sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ApiError(f"the daemon on {path} closed the connection without a reply")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ApiError(reply.get("error", "unknown error"))
    return reply["result"]
