"""The local control API: root-only socket, errors as replies, never a crash."""
import json
import os
import socket
import stat

import pytest

from control.api.unix import ApiError, ApiServer, call


@pytest.fixture
def server(tmp_path):
    def fail(args):
        raise ValueError(f"VM {args['name']!r} is unknown")

    srv = ApiServer(str(tmp_path / "gw.sock"), {"echo": lambda a: a, "fail": fail})
    srv.start()
    yield srv
    srv.close()


def _raw(path: str, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(payload)
        return json.loads(s.makefile("rb").readline())


def test_socket_is_root_only(server):
    mode = stat.S_IMODE(os.stat(server.path).st_mode)
    assert mode == 0o600


def test_call_returns_the_result(server):
    assert call(server.path, "echo", x=1, y="z") == {"x": 1, "y": "z"}


@pytest.mark.parametrize("payload,needle", [
    (b"{not json\n", "malformed JSON"),
    (b"[1,2]\n", 'string "cmd"'),
    (b'{"cmd": 5}\n', 'string "cmd"'),
    (b'{"cmd": "echo", "args": [1]}\n', '"args" must be an object'),
    (b'{"cmd": "nosuch"}\n', "unknown command 'nosuch'"),
    (b"\xff\xfe\n", "malformed JSON"),
])
def test_malformed_requests_get_an_error_reply_and_the_server_lives(server, payload, needle):
    reply = _raw(server.path, payload)
    assert reply["ok"] is False and needle in reply["error"]
    assert call(server.path, "echo", alive=True) == {"alive": True}


def test_oversized_request_is_refused(server):
    reply = _raw(server.path, b'{"cmd": "echo", "args": {"x": "' + b"a" * 70000 + b'"}}\n')
    assert reply["ok"] is False and "longer than" in reply["error"]


def test_handler_errors_become_api_errors_naming_the_culprit(server):
    with pytest.raises(ApiError, match="VM 'vm7' is unknown"):
        call(server.path, "fail", name="vm7")


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(ApiError, match="no xdpgw daemon is listening"):
        call(str(tmp_path / "none.sock"), "echo")


def test_merged_tables_refuse_a_command_defined_twice():
    from control.api.commands import merge

    a, b = {"vm.move": lambda args: 1}, {"vm.move": lambda args: 2, "vm.list": lambda args: []}
    with pytest.raises(ValueError, match=r"commands \['vm.move'\] are defined twice"):
        merge(a, b)
    assert sorted(merge(a, {"vm.list": b["vm.list"]})) == ["vm.list", "vm.move"]


def test_lookup_failures_are_not_found_and_the_rest_bad_requests():
    from control.api.commands import dispatch
    from control.api.errors import BadRequest, NotFound
    from control.gateway import GatewayError, UnknownName

    def unknown(args):
        raise UnknownName("unknown VM 'vm9'")

    def refused(args):
        raise GatewayError("VM 'vm1' has no port named unknown0")   # says "unknown", is no lookup

    with pytest.raises(NotFound, match="unknown VM 'vm9'"):
        dispatch({"x": unknown}, "x", {})
    with pytest.raises(BadRequest, match="no port named"):
        dispatch({"x": refused}, "x", {})
    with pytest.raises(NotFound, match="unknown command 'y'"):
        dispatch({"x": unknown}, "y", {})
