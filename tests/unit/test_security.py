"""Who may do what across machines, with real servers on loopback and real certificates
(tests/certs.py, the openssl command line, in the test's tmp_path):

* scopes: the HTTP agent serves the daemon's command table to the center's token, which
  gets 403 naming the command for everything outside the CENTER scope (vm.move among
  them: every command of the table is tried); the unix socket (LOCAL) reaches everything;
* tokens: a wrong token of the right length is 401 (compared in constant time);
* mutual TLS: an agent with tls_ca refuses a client certificate from another CA and a
  client without one; the center's client, configured per gateway, gets through, and
  verifies the agent's certificate;
* a listener on a non-loopback address needs TLS or `insecure = true` (the config checks)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Iterator

import aiohttp
import pytest

from control.api.commands import CENTER, LOCAL, allowed, dispatch, scoped
from control.api.errors import Forbidden
from control.api.http import AgentServer
from control.api.tls import client_ssl_context
from control.api.unix import ApiServer, call
from control.center.config import parse_center_document
from control.config import ConfigError, parse_config
from control.daemon import Daemon
from testbed.dcagent import DcAgent
from tests.certs import CA
from tests.unit.center_fixtures import document

TOKEN = "c3" * 16
# what the center's workflow calls (control/center/workflow.py; tests/unit/test_center_units.py
# asserts the same sequence): on the target data center's agent, and on the source gateway's
DC_CALLS = {"images", "image.put", "prepare", "drain", "status", "release"}
GATEWAY_CALLS = {"offload.set", "offload.clear"}


def gateway_toml(tmp_path, agent: str = "") -> str:
    return f"""
[gateway]
name = "gwsec"
interface = "eth9"
api_socket = "{tmp_path}/gw.sock"
registry = "{tmp_path}/registry.db"
pin_dir = "/sys/fs/bpf/xdpgw/gwsec"
{agent}"""


@contextlib.contextmanager
def serving(commands, **tls: str) -> Iterator[int]:
    """An AgentServer of `commands` on 127.0.0.1 (a free port, returned), closed at the end."""
    server = AgentServer("127.0.0.1", 0, TOKEN, commands, **tls)
    server.start()
    try:
        yield server.runner.addresses[0][1]
    finally:
        server.close()


async def post(session: aiohttp.ClientSession, url: str, token: str = TOKEN) -> tuple[int, dict]:
    async with session.post(url, data=b"{}", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


def test_the_center_reaches_only_its_scope_of_the_daemons_table(tmp_path):
    config = parse_config(gateway_toml(tmp_path, f'[agent]\nlisten = "127.0.0.1:7301"\ntoken = "{TOKEN}"\n'))
    table = Daemon(config).commands()
    assert {n for n, h in table.items() if allowed(h, CENTER)} == GATEWAY_CALLS | {"status"}
    assert "vm.move" in table and "capture.start" in table and "config.reload" in table

    with serving(table) as port:
        async def go() -> dict[str, tuple[int, dict]]:
            async with aiohttp.ClientSession() as s:
                return {name: await post(s, f"http://127.0.0.1:{port}/v1/cmd/{name}") for name in table}
        replies = asyncio.run(go())
    outside = sorted(n for n in table if not allowed(table[n], CENTER))
    assert len(outside) == len(table) - 3
    for name in outside:
        assert replies[name] == (403, {"ok": False, "error": f"command {name!r} is not open to the center scope "
                                                              "(open to: local)"}), name
    assert replies["status"][0] == 200 and replies["status"][1]["result"]["name"] == "gwsec"
    # what the center may not call, the local API (root, the unix socket) may
    api = ApiServer(str(tmp_path / "api.sock"), table)
    api.start()
    try:
        assert call(api.path, "monitor") == {}
        assert call(api.path, "status")["name"] == "gwsec"
    finally:
        api.close()


def test_the_workflow_calls_only_commands_open_to_it():
    dc = DcAgent("xsc", "/nonexistent/xsc.sock").commands()
    assert all(allowed(h, CENTER) for h in dc.values())
    assert DC_CALLS == set(dc)


def test_a_command_declares_its_scopes():
    table = {"plain": lambda a: "local", "open": scoped(lambda a: a, CENTER)}
    assert dispatch(table, "plain", {}, LOCAL) == "local"
    assert dispatch(table, "open", {"x": 1}, CENTER) == {"x": 1}
    with pytest.raises(Forbidden, match=r"^command 'plain' is not open to the center scope \(open to: local\)$"):
        dispatch(table, "plain", {}, CENTER)
    assert Forbidden.status == 403


def test_a_wrong_token_of_the_same_length_is_401():
    wrong = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")
    assert len(wrong) == len(TOKEN)
    with serving({"status": scoped(lambda a: "up", CENTER)}) as port:
        async def go():
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{port}/v1/cmd/status"
                return [await post(s, url, t) for t in (wrong, "", TOKEN)]
        assert asyncio.run(go()) == [(401, {"ok": False, "error": "missing or wrong token"})] * 2 + \
            [(200, {"ok": True, "result": "up"})]


# ------------------------------------------------------------------ mutual TLS

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "agents-ca"), CA(d, "other-ca")
    return {"ca": ca, "server": ca.issue("agent", ["127.0.0.1"]), "center": ca.issue("center", []),
            "other_ca": other, "intruder": other.issue("center", [])}


def center_for(tmp_path, port: int, **tls: str):
    """The center's config with gw1's agent at https://127.0.0.1:port and the gateway entry's `tls`."""
    from control.center.server import Center

    tmp_path.mkdir()
    doc = document(tmp_path)
    doc["gateway"][0].update(agent=f"https://127.0.0.1:{port}", agent_token=TOKEN, **tls)
    return Center(parse_center_document(doc, str(tmp_path)))


def center_status(center, port: int) -> object:
    """`status` on gw1's agent through the center's own client (its TLS from the gateway entry)."""
    async def go():
        async with aiohttp.ClientSession() as center.session:
            return await center._agent(f"https://127.0.0.1:{port}", TOKEN).call("status")
    return asyncio.run(go())


def test_mutual_tls(tmp_path, pki):
    from control.center.client import CenterError

    ca, server = pki["ca"], pki["server"]
    with serving({"status": scoped(lambda a: "up", CENTER)}, tls_cert=server.cert, tls_key=server.key,
                 tls_ca=ca.cert) as port:
        ok = center_for(tmp_path / "ok", port, tls_ca=ca.cert, tls_cert=pki["center"].cert,
                        tls_key=pki["center"].key)
        assert center_status(ok, port) == "up"
        for name, tls in (("another CA's certificate", dict(tls_ca=ca.cert, tls_cert=pki["intruder"].cert,
                                                                tls_key=pki["intruder"].key)),
                          ("no certificate", dict(tls_ca=ca.cert))):
            with pytest.raises(CenterError) as err:
                center_status(center_for(tmp_path / name.replace(" ", "-"), port, **tls), port)
            assert err.value.status is None, name          # no HTTP answer: the handshake failed
        # the center verifies the agent: a server certificate from a CA it does not trust fails
        with pytest.raises(CenterError, match="CERTIFICATE_VERIFY_FAILED"):
            center_status(center_for(tmp_path / "wrong-ca", port, tls_ca=pki["other_ca"].cert,
                                     tls_cert=pki["center"].cert, tls_key=pki["center"].key), port)
        # the same at the TLS layer: without a certificate no HTTP byte comes back
        ctx = client_ssl_context(ca.cert)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                try:
                    tls.sendall(b"POST /v1/cmd/status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    reply = tls.recv(1024)
                except (ssl.SSLError, ConnectionResetError):
                    reply = b""
                assert reply == b""


# ------------------------------------------------------------------ listeners

LOOPBACK_ERR = "{key}.listen: {listen} is not a loopback address: set {key}.tls_cert/tls_key, or insecure = true"


@pytest.mark.parametrize("listen", ["198.18.0.2:7301", "0.0.0.0:7301", "[2001:db8::2]:7301", "[::]:7301"])
def test_a_plaintext_agent_off_loopback_is_refused(tmp_path, listen):
    agent = f'[agent]\nlisten = "{listen}"\ntoken = "t"\n'
    with pytest.raises(ConfigError) as err:
        parse_config(gateway_toml(tmp_path, agent))
    assert str(err.value) == LOOPBACK_ERR.format(key="agent", listen=listen)
    assert parse_config(gateway_toml(tmp_path, agent + "insecure = true\n")).agent.insecure is True


def test_agent_listener_keys(tmp_path, pki):
    s = pki["server"]
    for listen in ("127.0.0.1:7301", "127.0.0.9:7301", "[::1]:7301"):
        assert parse_config(gateway_toml(tmp_path, f'[agent]\nlisten = "{listen}"\ntoken = "t"\n')).agent
    tls = f'[agent]\nlisten = "198.18.0.2:7301"\ntoken = "t"\ntls_cert = "{s.cert}"\ntls_key = "{s.key}"\n'
    config = parse_config(gateway_toml(tmp_path, tls + f'tls_ca = "{pki["ca"].cert}"\n'))
    assert config.agent.tls_ca == pki["ca"].cert and parse_config(config.to_toml()) == config
    for extra, message in (('insecure = "yes"', 'agent.insecure: must be true or false, got string "yes"'),
                           ("insecure = 1", "agent.insecure: must be true or false, got integer 1")):
        with pytest.raises(ConfigError) as err:
            parse_config(gateway_toml(tmp_path, f'[agent]\nlisten = "198.18.0.2:7301"\ntoken = "t"\n{extra}\n'))
        assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        parse_config(gateway_toml(tmp_path, f'[agent]\nlisten = "127.0.0.1:7301"\ntoken = "t"\n'
                                            f'tls_ca = "{pki["ca"].cert}"\n'))
    assert str(err.value) == ("agent.tls_ca: needs tls_cert and tls_key: client certificates are checked over TLS")


def test_center_listener_and_agent_tls_keys(tmp_path, pki):
    doc = document(tmp_path)
    doc["center"]["listen"] = "198.18.0.1:7300"
    with pytest.raises(ConfigError) as err:
        parse_center_document(doc, str(tmp_path))
    assert str(err.value) == LOOPBACK_ERR.format(key="center", listen="198.18.0.1:7300")
    doc["center"]["insecure"] = True
    assert parse_center_document(doc, str(tmp_path)).insecure is True
    # an agent's TLS files: relative to the config file, only for an https agent
    doc = document(tmp_path)
    doc["gateway"][0]["tls_ca"] = "agents-ca.pem"
    with pytest.raises(ConfigError) as err:
        parse_center_document(doc, str(tmp_path))
    assert str(err.value) == "gateway[0].tls_ca: set, but agent 'http://198.18.0.2:7301' is not an https:// URL"
    doc["gateway"][0]["agent"] = "https://198.18.0.2:7301"
    with pytest.raises(ConfigError) as err:
        parse_center_document(doc, str(tmp_path))
    assert str(err.value) == "gateway[0].tls_ca: 'agents-ca.pem' is not a file"
    config = parse_center_document(doc, str(pki["ca"].dir))
    assert config.gateways[0].tls_ca == pki["ca"].cert
    doc["gateway"][0]["tls_cert"] = pki["center"].cert
    with pytest.raises(ConfigError) as err:
        parse_center_document(doc, str(pki["ca"].dir))
    assert str(err.value) == "gateway[0].tls_key: tls_cert and tls_key go together"
