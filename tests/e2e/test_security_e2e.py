"""Who may do what across machines, on the testbed's addresses (namespaces, not loopback):

* `xdpgw run` with a plaintext [agent] on gw1's uplink address, `xdpgw center` on the
  router's and dc2's agent on dc2's endpoint refuse to start, each with one line naming
  the key or flag; with `insecure = true` the gateway starts, and from the router's
  namespace (where the center lives) the center's token gets `status` and 403 for
  `vm.move` and every other command outside the center's scope;
* dc2's agent with mutual TLS (certificates for 198.18.200.2 made here with openssl):
  from the router, a client with the right certificate is served, one with a
  certificate from another CA and one without any get no HTTP answer.
Prefix "xsc" + 3 hex; the testbed removes its namespaces, pins and processes, also on failure."""
from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import ssl
import subprocess
import sys

import pytest

from control.api.commands import CENTER, allowed
from control.api.tls import client_ssl_context
from control.config import AgentConfig
from control.daemon import Daemon
from testbed.addresses import DC2_ENDPOINT, ROUTER_IP, UPLINK_IP
from testbed.config import testbed_config as make_config
from testbed.kit import xdpgw_executable
from testbed.offload import DC_AGENT_READY, OffloadLab, ReadyProcess
from testbed.topology import Testbed
from tests.certs import CA
from tests.e2e.conftest import running_testbed, unique_prefix

PREFIX = unique_prefix("xsc")
TOKEN = "5e" * 16
AGENT_PORT, DC_PORT = 7311, 7312
LOOPBACK_ERR = "{listen} is not a loopback address: "


def call(tb: Testbed, host: str, port: int, command: str, tls: ssl.SSLContext | None = None,
         token: str = TOKEN) -> tuple[int, dict]:
    """POST /v1/cmd/<command> from the router's namespace: (status, reply)."""
    sock = tb.socket("rt", socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((host, port))
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.sock = tls.wrap_socket(sock, server_hostname=host) if tls else sock
    try:
        conn.request("POST", f"/v1/cmd/{command}", body=b"{}", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def refused_at_start(argv: list[str], tb: Testbed, role: str | None = None) -> str:
    """Run `argv` (in `role`'s namespace, or as it is): it must exit 2 with one line on stderr."""
    p = tb.cmd(role, argv, check=False) if role else \
        subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bed():
    with running_testbed(PREFIX, dc2_gateway=True) as env:
        yield env


def test_the_gateway_agent_on_a_namespace_address(bed, tmp_path):
    tb = bed.tb
    listen = f"{UPLINK_IP}:{AGENT_PORT}"
    config = make_config(PREFIX, agent=AgentConfig(listen=listen, token=TOKEN, insecure=True))
    plain = tmp_path / "plain.toml"
    plain.write_text(config.to_toml().replace("insecure = true\n", ""))
    line = refused_at_start([xdpgw_executable(), "run", "--config", str(plain)], tb)
    assert line == f"xdpgw: {plain}: agent.listen: {LOOPBACK_ERR.format(listen=listen)}" \
                   "set agent.tls_cert/tls_key, or insecure = true"

    bed.launch(config, tmp_path / "insecure.toml")
    status, reply = call(tb, UPLINK_IP, AGENT_PORT, "status")
    assert status == 200 and reply["result"]["name"] == "gw1"
    assert call(tb, UPLINK_IP, AGENT_PORT, "vm.move") == \
        (403, {"ok": False, "error": "command 'vm.move' is not open to the center scope (open to: local)"})
    # the daemon's table, as the running one has it (its own registry file: not the running daemon's)
    table = Daemon(dataclasses.replace(config, gateway=dataclasses.replace(
        config.gateway, registry=str(tmp_path / "table.db")))).commands()
    for name in sorted(n for n, h in table.items() if not allowed(h, CENTER)):
        assert call(tb, UPLINK_IP, AGENT_PORT, name)[0] == 403, name
    assert call(tb, UPLINK_IP, AGENT_PORT, "status", token=TOKEN[::-1])[0] == 401


def test_the_center_on_a_namespace_address(bed, tmp_path):
    tb = bed.tb
    lab = OffloadLab(center_token=TOKEN)
    path = lab.write_center_config(tmp_path)
    path.write_text(path.read_text().replace("insecure = true\n", ""))
    line = refused_at_start([xdpgw_executable(), "center", "--config", str(path)], tb, "rt")
    listen = f"{ROUTER_IP}:{lab.center_port}"
    assert line == f"xdpgw: {path}: center.listen: {LOOPBACK_ERR.format(listen=listen)}" \
                   "set center.tls_cert/tls_key, or insecure = true"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "agents-ca"), CA(d, "other-ca")
    return {"ca": ca, "server": ca.issue("dc2-agent", [DC2_ENDPOINT]), "center": ca.issue("center", []),
            "other_ca": other, "intruder": other.issue("center", [])}


def dc_agent(tb: Testbed, *flags: str) -> list[str]:
    return [sys.executable, "-m", "testbed.dcagent", "--netns", tb.ns("dc2"), "--prefix", tb.prefix,
            "--listen", f"{DC2_ENDPOINT}:{DC_PORT}", "--token", TOKEN, *flags]


def test_the_dc_agent_with_mutual_tls(bed, pki):
    tb = bed.tb
    line = refused_at_start(dc_agent(tb), tb)
    assert line == f"python -m testbed.dcagent: --listen: {LOOPBACK_ERR.format(listen=f'{DC2_ENDPOINT}:{DC_PORT}')}" \
                   "give --tls-cert/--tls-key, or --insecure"

    ca, server = pki["ca"], pki["server"]
    agent = ReadyProcess(tb, tb.spawn(dc_agent(tb, "--tls-cert", server.cert, "--tls-key", server.key,
                                               "--tls-ca", ca.cert),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE), DC_AGENT_READY)
    try:
        right = client_ssl_context(ca.cert, pki["center"].cert, pki["center"].key)
        assert call(tb, DC2_ENDPOINT, DC_PORT, "status", right) == (200, {"ok": True, "result": {"requests": {}}})
        for tls in (client_ssl_context(ca.cert, pki["intruder"].cert, pki["intruder"].key),
                    client_ssl_context(ca.cert)):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                call(tb, DC2_ENDPOINT, DC_PORT, "status", tls)
        # the center's side verifies dc2's certificate: one from a CA it does not trust fails
        with pytest.raises(ssl.SSLCertVerificationError):
            call(tb, DC2_ENDPOINT, DC_PORT, "status", client_ssl_context(pki["other_ca"].cert, pki["center"].cert,
                                                                         pki["center"].key))
    finally:
        agent.stop()
