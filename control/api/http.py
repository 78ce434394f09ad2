"""The agent API: a command table (the daemon's `commands()`, the same one the local
unix-socket API serves) over HTTP/JSON with a token, for the control center.

    POST /v1/cmd/<command>   body: the command's arguments (a JSON object)
      200 {"ok": true, "result": ...}
      400 malformed JSON / bad arguments, 401 token, 404 unknown command or name, 409 refused

It runs its own asyncio loop on a thread of the daemon; handlers (which touch the
maps) run in that loop's thread pool, so one slow call does not block others."""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
from typing import Any, Callable

from aiohttp import web

Handler = Callable[[dict[str, Any]], Any]


def error_status(message: str) -> int:
    """404 for what names something that does not exist, 400 for everything else."""
    return 404 if message.startswith("unknown ") or " unknown " in message[:40] else 400


def make_app(commands: dict[str, Handler], token: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), token.encode())):
            return web.json_response({"ok": False, "error": "missing or wrong token"}, status=401)
        name = request.match_info["cmd"]
        handler = commands.get(name)
        if handler is None:
            return web.json_response({"ok": False, "error": f"unknown command {name!r}; known: {sorted(commands)}"},
                                     status=404)
        try:
            args = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            return web.json_response({"ok": False, "error": f"malformed JSON: {exc}"}, status=400)
        if not isinstance(args, dict):
            return web.json_response({"ok": False, "error": "the body must be a JSON object"}, status=400)
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, handler, args)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
            message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
            return web.json_response({"ok": False, "error": message}, status=error_status(message))
        return web.json_response({"ok": True, "result": result})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/cmd/{cmd}", handle)
    return app


class AgentServer:
    """Serves `commands` on host:port (optionally TLS) from a thread; start() returns once listening."""

    def __init__(self, host: str, port: int, token: str, commands: dict[str, Handler],
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self.host, self.port, self.token, self.commands = host, port, token, commands
        self.tls = (tls_cert, tls_key) if tls_cert else None
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
        from control.center.server import ssl_context

        self.runner = web.AppRunner(make_app(self.commands, self.token), access_log=None)
        await self.runner.setup()
        ctx = ssl_context(*self.tls) if self.tls else None
        await web.TCPSite(self.runner, self.host, self.port, ssl_context=ctx).start()

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise RuntimeError(f"agent API cannot listen on {self.host}:{self.port}: {self._error}")

    def close(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
