"""`cotexnet app`'s front door over plain HTTP (no browser): without a token only loopback Host headers are
served (no DNS rebinding), a non-loopback --host gets a random token printed at start and refuses anything
without it, and a websocket from another origin is refused. Runs in the app's virtualenv (scripts/test-app.sh).
"""
from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trame_slicer", reason="the web app's virtualenv is not in use: run scripts/test-app.sh")

from cotexnet_app.gateway import TOKEN_COOKIE, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def start_app(data_root: Path, *arguments):
    """Starts `cotexnet app` on a free port; returns the process, its port and the address it printed (its
    output goes to a file: a pipe nobody reads would block it once its session processes log enough)."""
    data_root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_root.parent / f"{data_root.name}-app.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(data_root), "--port", str(port),
             "--device", "cpu", *arguments],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(data_root.parent / "config")})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the address is printed just before the gateway binds
        printed = log.read_text().partition("\n")[0].strip()
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).connect()
            return process, port, printed
        except OSError:
            assert process.poll() is None, f"the app ended at start: {log.read_text()}"
            time.sleep(0.2)
    raise AssertionError(f"the app did not open port {port}: {log.read_text()}")


def stop(process) -> None:
    from CoTexNetSegmentLib.processes import killProcessTree

    killProcessTree(process, timeout=10.0)


def get(port, path="/", **headers) -> http.client.HTTPResponse:
    """A GET to the gateway on 127.0.0.1 with the given headers (Host included: http.client then sends ours)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", path, headers={"Host": f"127.0.0.1:{port}", **headers})
    reply = connection.getresponse()
    reply.text = reply.read().decode(errors="replace")
    return reply


@pytest.fixture
def loopback_app(tmp_path):
    process, port, printed = start_app(tmp_path / "root")
    yield port, printed
    stop(process)


def test_without_a_token_only_loopback_host_headers_are_served(loopback_app):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: the gateway refuses any Host that is not a
    loopback name, and a websocket whose Origin is another site, before a session is started."""
    port, printed = loopback_app
    assert printed == f"CoTexNet app: open http://127.0.0.1:{port}/"  # no token on loopback
    for host in (f"attacker.example:{port}", f"192.168.1.20:{port}", "attacker.example"):
        refused = get(port, Host=host)
        assert refused.status == 403 and f"host {host!r} refused" in refused.text
    websocket = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    refused = get(port, "/ws", Origin="http://attacker.example", **websocket)
    assert refused.status == 403 and "another origin" in refused.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        served = get(port, "/index.html", Host=host)
        assert served.status == 200 and "<html" in served.text.lower(), (host, served.status, served.text[:200])


def test_a_non_loopback_host_gets_a_random_token_printed_and_required(tmp_path):
    """--host 0.0.0.0 without --token: a random token is printed in the address; requests without it (or with
    another) are refused; with it the gateway sets an HttpOnly, SameSite=Strict cookie, drops the token from
    the address, and then serves any Host name (the token, not the name, is the check)."""
    tokens = []
    for run in range(2):
        process, port, printed = start_app(tmp_path / f"run{run}", "--host", "0.0.0.0")
        try:
            match = re.fullmatch(rf"CoTexNet app: open http://127\.0\.0\.1:{port}/\?token=([\w-]+)", printed)
            assert match, printed
            token = match.group(1)
            tokens.append(token)
            assert len(token) >= 32
            for path in ("/", "/?token=wrong", f"/?token={token[:-1]}"):
                refused = get(port, path)
                assert refused.status == 403 and "a valid token is required" in refused.text
            accepted = get(port, f"/?token={token}&x=1")
            assert accepted.status == 302 and accepted.getheader("Location") == "/?x=1"
            cookie = accepted.getheader("Set-Cookie")
            assert cookie.startswith(f"{TOKEN_COOKIE}={token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            served = get(port, "/index.html", Host=f"workstation.lab:{port}", Cookie=f"{TOKEN_COOKIE}={token}")
            assert served.status == 200 and "<html" in served.text.lower()
        finally:
            stop(process)
    assert tokens[0] != tokens[1], "the token must be random per start"
