"""Starting a server child on loopback: a port taken between choosing it and binding it is replaced."""

from __future__ import annotations

import socket
import sys

import httpx
import pytest

from kvcat.server.launch import PORT_CLASH, ServerProcess, ServerStartError

# A stand-in child that binds --port as the server does: 200 on every GET, or uvicorn's error when it is taken.
CHILD = f"""
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
try:
    server = http.server.HTTPServer(("127.0.0.1", port), Ready)
except OSError as e:
    print("ERROR: error while attempting to bind:", "{PORT_CLASH}", e, flush=True)
    sys.exit(1)
server.serve_forever()
"""


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _child_on(port: int, given: bool) -> ServerProcess:
    srv = ServerProcess("unused", port=port if given else None, ready_timeout=30)
    srv.port = port
    srv.cmd = [sys.executable, "-c", CHILD, "--port", str(port)]
    return srv


def test_a_chosen_port_taken_before_the_bind_is_replaced(taken_port):
    srv = _child_on(taken_port, given=False)
    with srv:
        assert srv.port != taken_port and srv.cmd[-1] == str(srv.port)
        assert httpx.get(srv.url("/ready"), timeout=5).status_code == 200


def test_a_port_the_caller_gave_is_never_replaced(taken_port):
    srv = _child_on(taken_port, given=True)
    with pytest.raises(ServerStartError, match=PORT_CLASH):
        srv.start()
    assert srv.port == taken_port
