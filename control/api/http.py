"""HTTP/JSON with a bearer token: what the control center's API and the agent API
share (token check, JSON body, TLS), and the agent API itself: a command table (the
daemon's, the same one the local unix-socket API serves) for the control center,
which may call only the commands open to the CENTER scope (control/api/commands.py).

    POST /v1/cmd/<command>   body: the command's arguments (a JSON object)
      200 {"ok": true, "result": ...}
      400 malformed JSON / bad arguments, 401 token, 403 a command outside the center's scope,
      404 unknown command or name, 409 refused

It runs its own asyncio loop on a thread of the daemon; handlers (which touch the
maps) run in that loop's thread pool, so one slow call does not block others."""
from __future__ import annotations

import asyncio
import hmac
import ssl
import threading
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from control.api.commands import CENTER, Handler, dispatch, handler_of, parse_json
from control.api.errors import BadRequest, CommandError


def check_bearer(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    auth = request.headers.get("Authorization", "")
    return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), token.encode())


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object (an empty body is {}); else BadRequest."""
    body = parse_json(await request.read() or b"{}")
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def ssl_context(cert: str | None, key: str | None, ca: str | None = None) -> ssl.SSLContext | None:
    """A server-side TLS context from a certificate chain and key; None (plain HTTP) without a
    certificate. With `ca` (mutual TLS), a client must present a certificate that `ca` signed."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_app(commands: Mapping[str, Handler], token: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if not check_bearer(request, token):
            return web.json_response({"ok": False, "error": "missing or wrong token"}, status=401)
        name = request.match_info["cmd"]
        try:
            handler_of(commands, name, CENTER)   # unknown (404) or out of scope (403) whatever the body
            args = await json_body(request)
            result = await asyncio.get_running_loop().run_in_executor(None, dispatch, commands, name, args, CENTER)
        except CommandError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=exc.status)
        return web.json_response({"ok": True, "result": result})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/cmd/{cmd}", handle)
    return app


class AgentServer:
    """Serves the CENTER scope of `commands` on host:port (optionally TLS, optionally requiring
    client certificates signed by `tls_ca`) from a thread; start() returns once listening."""

    def __init__(self, host: str, port: int, token: str, commands: Mapping[str, Handler],
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None) -> None:
        self.host, self.port, self.token, self.commands = host, port, token, commands
        self.tls = (tls_cert, tls_key, tls_ca)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._run, name="xdpgw-agent", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    async def _start(self) -> None:
        self.runner = web.AppRunner(make_app(self.commands, self.token), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, ssl_context=ssl_context(*self.tls)).start()

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise RuntimeError(f"agent API cannot listen on {self.host}:{self.port}: {self._error}")

    def close(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
