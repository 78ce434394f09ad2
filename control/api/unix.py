"""The local control API: one JSON request per line over a root-only unix
socket, one JSON reply per line. Malformed requests get an error reply; they
never take the daemon down."""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Mapping
from typing import Any

from control.api.commands import Handler, dispatch, parse_json
from control.api.errors import BadRequest, CommandError

MAX_REQUEST = 64 * 1024
log = logging.getLogger(__name__)


class ApiError(RuntimeError):
    """The daemon answered with an error, or could not be reached."""


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST + 1)
        reply = self.server.dispatch(line)          # type: ignore[attr-defined]
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, commands: Mapping[str, Handler]) -> None:
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

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A handler's bug: logged with its traceback (socketserver would print it bare)."""
        log.exception("api request failed")

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            if len(line) > MAX_REQUEST:
                raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
            request = parse_json(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise BadRequest('request must be an object with a string "cmd"')
            args = request.get("args", {})
            if not isinstance(args, dict):
                raise BadRequest('"args" must be an object')
            return {"ok": True, "result": dispatch(self.commands, request["cmd"], args)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}


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
