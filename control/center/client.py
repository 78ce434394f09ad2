"""Clients of the center's and the agents' HTTP/JSON APIs.

CenterClient is synchronous (stdlib urllib): gateways and the CLI use it.
AgentClient is asynchronous (aiohttp): the center's workflow uses it to call
gateway agents (`POST /v1/cmd/<command>`, the daemon's command table)."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from control.api.tls import client_ssl_context


class CenterError(RuntimeError):
    """A call failed: `status` is the HTTP status (None: no answer), str() the server's message."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


class CenterClient:
    def __init__(self, url: str, token: str, timeout: float = 5.0, cafile: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = client_ssl_context(cafile) if self.url.startswith("https:") else None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise CenterError(exc.code, f"{exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise CenterError(None, f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None


class AgentClient:
    """Calls one agent's command table: `await call("offload.set", region=..., ...)`; an https
    agent is verified with `tls` (the system's CAs without), which may carry a client certificate."""

    def __init__(self, session, url: str, token: str, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls

    async def call(self, command: str, **args: Any) -> Any:
        import aiohttp

        try:
            async with self.session.post(f"{self.url}/v1/cmd/{command}", json=args,
                                         headers={"Authorization": f"Bearer {self.token}"}, ssl=self.tls or True,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                try:
                    reply = await resp.json(content_type=None)
                except ValueError:
                    reply = {"error": (await resp.text())[:200]}
                if resp.status != 200:
                    raise CenterError(resp.status, f"agent {self.url} {command}: {resp.status} "
                                                   f"{(reply or {}).get('error', '')}")
                return reply["result"]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CenterError(None, f"agent {self.url} {command}: {type(exc).__name__} {exc}") from None
