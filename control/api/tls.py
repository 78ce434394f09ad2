"""Client-side TLS, without aiohttp: the center's HTTP clients and the etcd store share it."""
from __future__ import annotations

import ssl


def client_ssl_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client-side TLS context: the server is verified against `ca` (the system's CAs without);
    `cert` and `key` are the client certificate a mutual-TLS server asks for."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
