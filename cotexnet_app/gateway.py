"""The front door of ``cotexnet app``: token check, one scene per browser session, proxy to it.

A trame server holds one state (and here one MRML scene) for everyone connected to it, so each browser
session gets its own session process (:mod:`cotexnet_app.session`) on a private loopback port, and this
gateway forwards that browser's HTTP requests and websocket to it. A session is a cookie; a session
process whose browser has gone (no websocket for ``idle_timeout`` seconds) is ended with its worker.

Security: the gateway binds to 127.0.0.1 unless told otherwise; on any other host a token is required
(``?token=...`` once, then an HttpOnly cookie). Without a token only loopback ``Host`` headers are
served (no DNS rebinding), and websockets must come from the page's own origin. Session processes accept
only requests that carry their session's secret, which only the gateway knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE, SESSION_COOKIE = "cotexnet_token", "cotexnet_session"
SECRET_HEADER = "X-CoTexNet-Session-Secret"
SECRET_ENVIRONMENT = "COTEXNET_APP_SECRET"
#: Headers that describe one hop, not the message (RFC 9110 section 7.6.1), and are not forwarded.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                "transfer-encoding", "upgrade", "host", "content-length", "cookie"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Session:
    """One browser session's process: its own trame server, MRML scene and worker."""

    process: subprocess.Popen
    port: int
    secret: str
    sockets: int = 0
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Gateway:
    """Serves ``host:port``; ``session_args`` are the arguments of every session process."""

    def __init__(self, session_args: list[str], *, host: str = "127.0.0.1", port: int = 8080,
                 token: Optional[str] = None, max_sessions: int = 4, idle_timeout: float = 120.0,
                 start_timeout: float = 120.0, max_message_bytes: int = 64 << 20):
        self.session_args = session_args
        self.host, self.port, self.token = host, port, token
        self.max_sessions, self.idle_timeout, self.start_timeout = max_sessions, idle_timeout, start_timeout
        self.max_message_bytes = max_message_bytes  # one websocket message: an upload is one message
        self.sessions: dict[str, Session] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._client: Optional[ClientSession] = None

    # ------------------------------------------------------------------ checks
    def _token_ok(self, request: web.Request) -> bool:
        if not self.token:
            return True
        offered = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def _refusal(self, request: web.Request) -> Optional[str]:
        """Why this request is refused, or None."""
        if not self._token_ok(request):
            return "a valid token is required: open the address that `cotexnet app` printed (it ends in ?token=...)"
        if not self.token and urlsplit(f"//{request.host}").hostname not in LOOPBACK_HOSTS:
            return f"host {request.host!r} refused: without --token the app answers on loopback addresses only"
        origin = request.headers.get("Origin")
        if request.headers.get("Upgrade", "").lower() == "websocket" and origin and urlsplit(origin).netloc != request.host:
            return f"websocket from another origin ({origin}) refused"
        return None

    # ------------------------------------------------------------------ sessions
    async def _start_session(self) -> Session:
        secret = secrets.token_urlsafe(32)
        port = free_port()
        command = [sys.executable, "-m", "cotexnet_app.session", "--port", str(port), *self.session_args]
        environment = {**os.environ, SECRET_ENVIRONMENT: secret, "PYTHONUNBUFFERED": "1",
                       "WSLINK_MAX_MSG_SIZE": str(self.max_message_bytes)}  # wslink's cap on one message
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL)
        session = Session(process, port, secret)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise web.HTTPInternalServerError(text=f"the session process ended at start (exit code {process.returncode})")
            with contextlib.suppress(OSError):
                async with self._client.get(session.url + "/", headers={SECRET_HEADER: secret}) as reply:
                    if reply.status == 200:
                        return session
            await asyncio.sleep(0.25)
        self._end(session)
        raise web.HTTPServiceUnavailable(text=f"the session process did not answer within {self.start_timeout:.0f} s")

    async def _session_for(self, request: web.Request) -> tuple[Session, Optional[str]]:
        """The browser's session (and its new cookie value when one was created)."""
        key = request.cookies.get(SESSION_COOKIE, "")
        if key in self.sessions:
            return self.sessions[key], None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            raise web.HTTPGone(text="this session has ended; reload the page")
        if len(self.sessions) + len(self._starting) >= self.max_sessions:
            raise web.HTTPServiceUnavailable(text=f"{self.max_sessions} sessions are open (--max-sessions); try later")
        key = secrets.token_urlsafe(24)
        self._starting[key] = asyncio.ensure_future(self._start_session())
        try:
            self.sessions[key] = await self._starting[key]
        finally:
            del self._starting[key]
        logging.info(f"session {key[:6]}... started (pid {self.sessions[key].process.pid}, port {self.sessions[key].port})")
        return self.sessions[key], key

    def _end(self, session: Session) -> None:
        if session.process.poll() is None:
            from cotexnet_app.logic_path import add_slicer_logic_to_path

            add_slicer_logic_to_path()
            from CoTexNetSegmentLib.processes import killProcessTree  # the session's worker goes with it

            killProcessTree(session.process, timeout=5.0)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 2))
            now = time.monotonic()
            for key, session in list(self.sessions.items()):
                if session.process.poll() is not None or (
                        session.sockets == 0 and now - session.last_seen > self.idle_timeout):
                    del self.sessions[key]
                    await asyncio.get_running_loop().run_in_executor(None, self._end, session)
                    logging.info(f"session {key[:6]}... ended")

    # ------------------------------------------------------------------ proxy
    async def handle(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal:
            return web.Response(status=403, text=refusal)
        if self.token and "token" in request.query:  # keep the token out of the address bar and history
            reply = web.HTTPFound(request.rel_url.with_query([(k, v) for k, v in request.query.items() if k != "token"]))
            reply.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
            return reply
        session, new_key = await self._session_for(request)
        session.last_seen = time.monotonic()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._proxy_websocket(request, session)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[SECRET_HEADER] = session.secret
        async with self._client.request(request.method, session.url + request.rel_url.path_qs, headers=headers,
                                        data=await request.read(), allow_redirects=False) as upstream:
            body = await upstream.read()
            reply = web.Response(status=upstream.status, body=body, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}})
        if new_key:
            reply.set_cookie(SESSION_COOKIE, new_key, httponly=True, samesite="Strict")
        return reply

    async def _proxy_websocket(self, request: web.Request, session: Session) -> web.WebSocketResponse:
        browser = web.WebSocketResponse(max_msg_size=self.max_message_bytes)
        await browser.prepare(request)
        session.sockets += 1
        try:
            async with self._client.ws_connect(session.url + request.rel_url.path_qs, max_msg_size=self.max_message_bytes,
                                               headers={SECRET_HEADER: session.secret}) as upstream:
                async def forward(source, target):
                    async for message in source:
                        if message.type == WSMsgType.TEXT:
                            await target.send_str(message.data)
                        elif message.type == WSMsgType.BINARY:
                            await target.send_bytes(message.data)
                        else:
                            break
                    await target.close()

                await asyncio.gather(forward(browser, upstream), forward(upstream, browser), return_exceptions=True)
        finally:
            session.sockets -= 1
            session.last_seen = time.monotonic()
        return browser

    # ------------------------------------------------------------------ run
    async def _on_startup(self, app: web.Application) -> None:
        self._client = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))
        app["reaper"] = asyncio.ensure_future(self._reap())

    async def _on_cleanup(self, app: web.Application) -> None:
        app["reaper"].cancel()
        for session in self.sessions.values():
            self._end(session)
        self.sessions.clear()
        await self._client.close()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)  # the page only sends small requests; data goes by websocket
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def run(self) -> None:
        web.run_app(self.application(), host=self.host, port=self.port, print=None)
