"""`cotexnet app`'s front door over plain HTTP (no browser): without a token only loopback Host headers are
served (no DNS rebinding), a non-loopback --host gets a random token printed at start and refuses anything
without it, and a websocket from another origin is refused; sessions start only for a same-origin page load
and end when their page never connects; wrong tokens are rate-limited; a signal ends every process of the
app even while a page is open; bad options and a busy port are one error line. Runs in the app's
virtualenv (scripts/test-app.sh).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trame_slicer", reason="the web app's virtualenv is not in use: run scripts/test-app.sh")

import psutil  # noqa: E402

from cotexnet_app.gateway import (  # noqa: E402
    CONNECT_TIMEOUT_S, SESSION_COOKIE, TOKEN_COOKIE, TOKEN_FAILURES, free_port)

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


# ------------------------------------------------------------------ issue 21: 17 sessions and tokens, 19 options
def sessions_of(process) -> list[psutil.Process]:
    return [child for child in psutil.Process(process.pid).children()
            if "cotexnet_app.session" in " ".join(child.cmdline())]


def test_17_only_a_same_origin_page_load_starts_a_session(tmp_path):
    """Another site's page (an image tag, a link, a fetch) and any path but the page's own cost no session."""
    process, port, _ = start_app(tmp_path / "root")
    try:
        for path, headers in [("/", {"Sec-Fetch-Site": "cross-site"}), ("/", {"Sec-Fetch-Site": "same-site"}),
                              ("/", {"Referer": "http://attacker.example/page"}),
                              ("/", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "image"}),
                              ("/index.html", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "document"}),
                              ("/js/trame.js", {}), ("/favicon.ico", {})]:
            refused = get(port, path, **headers)
            assert refused.status == 403 and refused.getheader("Set-Cookie") is None, (path, headers, refused.status)
        assert sessions_of(process) == []
        served = get(port, "/index.html", **{"Sec-Fetch-Site": "none", "Sec-Fetch-Dest": "document"})
        assert served.status == 200 and served.getheader("Set-Cookie").startswith(f"{SESSION_COOKIE}=")
        assert len(sessions_of(process)) == 1
    finally:
        stop(process)


def test_17_a_session_whose_page_never_connects_ends_within_seconds(tmp_path):
    """Page loads that never open the websocket (a script, a crawler) used to hold a session each until the
    idle timeout, locking the real user out with 503: now they end within seconds and the user gets in."""
    process, port, _ = start_app(tmp_path / "root", "--max-sessions", "1")
    try:
        assert get(port, "/index.html").status == 200
        [session] = sessions_of(process)
        assert get(port, "/index.html").status == 503  # full
        started = time.monotonic()
        session.wait(CONNECT_TIMEOUT_S + 30)
        print(f"a page that never connected: its session ended {time.monotonic() - started:.1f} s after the 503")
        assert get(port, "/index.html").status == 200
    finally:
        stop(process)


def test_17_idle_timeout_0_does_not_spin(tmp_path):
    process, port, _ = start_app(tmp_path / "root", "--idle-timeout", "0")
    try:
        gateway = psutil.Process(process.pid)
        before = sum(gateway.cpu_times()[:2])
        time.sleep(4)
        used = sum(gateway.cpu_times()[:2]) - before
        assert used < 0.4, f"the idle gateway used {used:.2f} s of CPU in 4 s"
    finally:
        stop(process)


def test_17_wrong_tokens_are_rate_limited(tmp_path):
    """Guessing the token: after TOKEN_FAILURES wrong ones from one address, every request from it (the right
    token too, or the answer would tell the guess) gets 429 with Retry-After, unchecked."""
    process, port, _ = start_app(tmp_path / "root", "--token", "the-right-token-0123456789")
    try:
        statuses = [get(port, f"/?token=guess{i}").status for i in range(30)]
        assert statuses == [403] * TOKEN_FAILURES + [429] * (30 - TOKEN_FAILURES)
        locked = get(port, "/?token=the-right-token-0123456789")
        assert locked.status == 429 and int(locked.getheader("Retry-After")) > 0 and "wrong tokens" in locked.text
    finally:
        stop(process)


@pytest.mark.parametrize("option, value, expected", [
    ("--port", "99999", "--port: expected a port number from 1 to 65535"),
    ("--upload-limit-mb", "nan", "--upload-limit-mb: expected a positive number of MiB, got nan"),
    ("--max-sessions", "0", "--max-sessions: expected at least 1, got 0"),
    ("--idle-timeout", "inf", "--idle-timeout: expected a number of seconds of at least 0, got inf"),
])
def test_19_a_bad_app_option_is_one_error_line(tmp_path, option, value, expected):
    result = subprocess.run([sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(tmp_path), option, value],
                            cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"cotexnet app: error: {expected}"), result.stderr


# ------------------------------------------------------------------ issue 20: 5 shutdown, busy port
def test_a_busy_port_is_one_error_line_and_prints_no_address(tmp_path):
    process, port, _ = start_app(tmp_path / "first")
    try:
        second = subprocess.run([sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(tmp_path / "first"),
                                 "--port", str(port)], cwd=REPO, capture_output=True, encoding="utf-8",
                                errors="replace", timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 2 and "open http" not in second.stdout, second
        assert second.stderr.strip() == (f"cotexnet app: error: cannot listen on 127.0.0.1:{port}: address already in "
                                         "use (another `cotexnet app`?); choose another --port")
    finally:
        stop(process)


async def open_page_and_websocket(port: int):
    """What a browser keeps open: the page's session cookie and its websocket."""
    import aiohttp

    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # unsafe: cookies from an IP
    async with client.get(f"http://127.0.0.1:{port}/index.html") as page:
        assert page.status == 200
    websocket = await client.ws_connect(f"http://127.0.0.1:{port}/ws", origin=f"http://127.0.0.1:{port}")
    return client, websocket


def start_a_shared_worker(session: psutil.Process) -> socket.socket:
    """Asks the gateway's shared workers (on the socket the session was given) for device facts, which starts
    an engine worker, as a session's first Segment would; returns the connection, which keeps it in use."""
    from cotexnet.worker import SOCKET_ENVIRONMENT

    connection = socket.socket(socket.AF_UNIX)
    connection.connect(session.environ()[SOCKET_ENVIRONMENT])
    connection.sendall(json.dumps({"id": 1, "type": "device_info"}).encode() + b"\n")
    reply = json.loads(connection.makefile().readline())
    assert reply["id"] == 1 and reply["event"] == "result", reply
    return connection


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["SIGTERM", "Ctrl-C twice"])
def test_a_signal_ends_every_process_while_a_page_is_open(tmp_path, signals):
    """The gateway used to stop listening and then wait for open pages (minutes); a second signal left the
    sessions and the worker running under PID 1. Now every process of the app ends within seconds."""
    process, port, _ = start_app(tmp_path / "root")
    loop = asyncio.new_event_loop()
    try:
        client, websocket = loop.run_until_complete(open_page_and_websocket(port))
        [session] = sessions_of(process)
        connection = start_a_shared_worker(session)
        tree = psutil.Process(process.pid).children(recursive=True)
        assert any("cotexnet.worker" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
        started = time.monotonic()
        for number in signals:
            process.send_signal(number)
            time.sleep(0.2)
        process.wait(15)
        gone, alive = psutil.wait_procs(tree, timeout=5)
        print(f"{len(tree)} processes ended {time.monotonic() - started:.1f} s after the first signal")
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        connection.close()
        loop.run_until_complete(client.close())
    finally:
        loop.close()
        if process.poll() is None:
            stop(process)
