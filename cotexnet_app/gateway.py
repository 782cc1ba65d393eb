"""The front door of ``cotexnet app``: token check, one scene per browser session, proxy to it.

A trame server holds one state (and here one MRML scene) for everyone connected to it, so each browser
session gets its own session process (:mod:`cotexnet_app.session`) on a private loopback port, and this
gateway forwards that browser's HTTP requests and websocket to it. A session is a cookie, given only on a
same-origin load of the page; a session process whose browser has gone (no websocket for ``idle_timeout``
seconds), or whose page never connected (``connect_timeout``), is ended. The sessions share the engine's
workers, one per (model, device), through :class:`cotexnet.worker.SharedWorkers` on a private Unix socket.
On SIGINT, SIGTERM or SIGHUP the gateway ends every session and worker (process trees) within seconds, even
while pages are open; a second signal kills what is left at once.

Security: the gateway binds to 127.0.0.1 unless told otherwise; on any other host a token is required
(``?token=...`` once, then an HttpOnly cookie). Without a token only loopback ``Host`` headers are
served (no DNS rebinding), and websockets must come from the page's own origin. Session processes accept
only requests that carry their session's secret, which only the gateway knows. Wrong tokens are
rate-limited per client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from cotexnet.errors import CoTexNetError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE, SESSION_COOKIE = "cotexnet_token", "cotexnet_session"
SECRET_HEADER = "X-CoTexNet-Session-Secret"
SECRET_ENVIRONMENT = "COTEXNET_APP_SECRET"
#: Headers that describe one hop, not the message (RFC 9110 section 7.6.1), and are not forwarded.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                "transfer-encoding", "upgrade", "host", "content-length", "cookie"}
#: The paths whose load starts a session: the page itself (its scripts and websocket then carry the cookie).
PAGE_PATHS = ("/", "/index.html")
#: Wrong tokens allowed per client address within TOKEN_WINDOW_S; more are answered 429 without a check.
TOKEN_FAILURES, TOKEN_WINDOW_S = 10, 60.0
#: Seconds a new session's page has to open its websocket (a browser takes one or two) before the session ends.
CONNECT_TIMEOUT_S = 15.0
#: Seconds that ending the sessions and workers may take at shutdown before what is left is killed.
SHUTDOWN_GRACE_S = 3.0


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
    connected: bool = False  # its page has opened a websocket at least once
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Gateway:
    """Serves ``host:port``; ``session_args`` are the arguments of every session process."""

    def __init__(self, session_args: list[str], *, host: str = "127.0.0.1", port: int = 8080,
                 token: Optional[str] = None, max_sessions: int = 4, idle_timeout: float = 120.0,
                 start_timeout: float = 120.0, connect_timeout: float = CONNECT_TIMEOUT_S,
                 max_message_bytes: int = 64 << 20,
                 share_workers: bool = hasattr(socket, "AF_UNIX")):
        self.session_args = session_args
        self.host, self.port, self.token = host, port, token
        self.max_sessions, self.idle_timeout, self.start_timeout = max_sessions, idle_timeout, start_timeout
        self.connect_timeout = connect_timeout  # a page that has not opened its websocket by then never will
        self.max_message_bytes = max_message_bytes  # one websocket message: an upload is one message
        self.share_workers = share_workers
        self.sessions: dict[str, Session] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._client: Optional[ClientSession] = None
        self._workers = None  # cotexnet.worker.SharedWorkers, when shared
        self._socket_folder: Optional[str] = None
        self._browsers: set[web.WebSocketResponse] = set()
        self._token_failures: dict[str, deque] = defaultdict(deque)
        self._stopping: Optional[asyncio.Event] = None

    # ------------------------------------------------------------------ checks
    def _token_ok(self, request: web.Request) -> bool:
        if not self.token:
            return True
        offered = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def _too_many_wrong_tokens(self, request: web.Request) -> bool:
        address = request.remote or ""
        failures = self._token_failures.get(address, ())
        while failures and time.monotonic() - failures[0] > TOKEN_WINDOW_S:
            failures.popleft()
        if not failures:
            self._token_failures.pop(address, None)  # the table holds only addresses that failed recently
        return len(failures) >= TOKEN_FAILURES

    def _refusal(self, request: web.Request) -> Optional[web.Response]:
        """The answer that refuses this request, or None."""
        if self.token and self._too_many_wrong_tokens(request):
            return web.Response(status=429, headers={"Retry-After": str(int(TOKEN_WINDOW_S))},
                                text=f"more than {TOKEN_FAILURES} wrong tokens in {TOKEN_WINDOW_S:.0f} s from this "
                                     "address: wait, then open the address that `cotexnet app` printed")
        if not self._token_ok(request):
            self._token_failures[request.remote or ""].append(time.monotonic())
            return web.Response(status=403, text="a valid token is required: open the address that `cotexnet app` "
                                                 "printed (it ends in ?token=...)")
        if not self.token and urlsplit(f"//{request.host}").hostname not in LOOPBACK_HOSTS:
            return web.Response(status=403, text=f"host {request.host!r} refused: without --token the app answers on "
                                                 "loopback addresses only")
        origin = request.headers.get("Origin")
        if _is_websocket(request) and origin and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text=f"websocket from another origin ({origin}) refused")
        return None

    @staticmethod
    def _why_no_new_session(request: web.Request) -> Optional[str]:
        """Why this request may not start a session (None: it is a same-origin load of the page). Another
        site's request, an image or script tag, or any other path would otherwise cost a whole session."""
        if _is_websocket(request):
            return "this session has ended; reload the page"
        if request.method != "GET" or request.path not in PAGE_PATHS:
            return "no session: open the app's page first"
        site = request.headers.get("Sec-Fetch-Site", "none")
        if site not in ("none", "same-origin"):
            return f"a page load from another site (Sec-Fetch-Site: {site}) does not start a session"
        if request.headers.get("Sec-Fetch-Dest", "document") != "document":
            return "only loading the page itself starts a session"
        referer = request.headers.get("Referer")
        if referer and urlsplit(referer).netloc != request.host:
            return "a page load from another site (Referer) does not start a session"
        return None

    # ------------------------------------------------------------------ sessions
    async def _start_session(self) -> Session:
        secret = secrets.token_urlsafe(32)
        port = free_port()
        command = [sys.executable, "-m", "cotexnet_app.session", "--port", str(port), *self.session_args]
        environment = {**os.environ, SECRET_ENVIRONMENT: secret, "PYTHONUNBUFFERED": "1",
                       "WSLINK_MAX_MSG_SIZE": str(self.max_message_bytes)}  # wslink's cap on one message
        if self._workers is not None:
            from cotexnet.worker import SOCKET_ENVIRONMENT

            environment[SOCKET_ENVIRONMENT] = self._workers.address  # its worker relays to the shared ones
        # Its own process group: a terminal's Ctrl-C reaches the gateway alone, which ends the sessions in order.
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, start_new_session=True)
        session = Session(process, port, secret)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise web.HTTPInternalServerError(text=f"the session process ended at start (exit code {process.returncode})")
            with contextlib.suppress(OSError):
                async with self._client.get(session.url + "/", headers={SECRET_HEADER: secret}) as reply:
                    if reply.status == 200:
                        session.last_seen = time.monotonic()  # the page's time to connect starts now
                        return session
            await asyncio.sleep(0.25)
        await self._end([session])
        raise web.HTTPServiceUnavailable(text=f"the session process did not answer within {self.start_timeout:.0f} s")

    async def _session_for(self, request: web.Request) -> tuple[Session, Optional[str]]:
        """The browser's session (and its new cookie value when one was created)."""
        key = request.cookies.get(SESSION_COOKIE, "")
        if key in self.sessions:
            return self.sessions[key], None
        refused = self._why_no_new_session(request)
        if refused:
            raise (web.HTTPGone if _is_websocket(request) else web.HTTPForbidden)(text=refused)
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

    async def _end(self, sessions: list[Session], grace: float = 5.0) -> None:
        """Ends the sessions' process trees (with their trainings) at once, in parallel."""
        from cotexnet_app.logic_path import add_slicer_logic_to_path

        add_slicer_logic_to_path()
        from CoTexNetSegmentLib.processes import killProcessTree

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, killProcessTree, session.process, grace)
                               for session in sessions if session.process.poll() is None))

    def _expired(self, session: Session, now: float) -> bool:
        if session.process.poll() is not None:
            return True
        if session.sockets:
            return False
        return now - session.last_seen > (self.idle_timeout if session.connected else self.connect_timeout)

    async def _reap(self) -> None:
        # never a busy loop, even with --idle-timeout 0 (a session then ends as soon as its page closes)
        interval = max(0.5, min(5.0, self.idle_timeout / 2, self.connect_timeout / 2))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key, session in list(self.sessions.items()):
                if self._expired(session, now):
                    del self.sessions[key]
                    await self._end([session])
                    logging.info(f"session {key[:6]}... ended" + ("" if session.connected else
                                                                  " (its page never connected)"))

    # ------------------------------------------------------------------ proxy
    async def handle(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if self.token and "token" in request.query:  # keep the token out of the address bar and history
            reply = web.HTTPFound(request.rel_url.with_query([(k, v) for k, v in request.query.items() if k != "token"]))
            reply.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
            return reply
        session, new_key = await self._session_for(request)
        session.last_seen = time.monotonic()
        if _is_websocket(request):
            return await self._proxy_websocket(request, session)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[SECRET_HEADER] = session.secret
        async with self._client.request(request.method, session.url + request.rel_url.path_qs, headers=headers,
                                        data=await request.read(), allow_redirects=False) as upstream:
            reply = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}})
            if new_key:
                reply.set_cookie(SESSION_COOKIE, new_key, httponly=True, samesite="Strict")
            await reply.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):  # streamed: no whole file held here
                await reply.write(chunk)
            await reply.write_eof()
        return reply

    async def _proxy_websocket(self, request: web.Request, session: Session) -> web.WebSocketResponse:
        browser = web.WebSocketResponse(max_msg_size=self.max_message_bytes)
        await browser.prepare(request)
        session.sockets += 1
        session.connected = True
        self._browsers.add(browser)
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
                        del message  # an upload's bytes are not kept while the next message is awaited
                    await target.close()

                await asyncio.gather(forward(browser, upstream), forward(upstream, browser), return_exceptions=True)
        finally:
            self._browsers.discard(browser)
            session.sockets -= 1
            session.last_seen = time.monotonic()
        return browser

    # ------------------------------------------------------------------ run
    async def _on_startup(self, app: web.Application) -> None:
        self._client = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))
        if self.share_workers:
            from cotexnet.worker import SharedWorkers

            self._socket_folder = tempfile.mkdtemp(prefix="cotexnet-app-")  # private: mode 0700
            self._workers = SharedWorkers(os.path.join(self._socket_folder, "workers.sock"))
            await self._workers.start()
        app["reaper"] = asyncio.ensure_future(self._reap())

    async def _on_shutdown(self, app: web.Application) -> None:
        """Ends the sessions and workers before the server waits for its open connections (the pages' websockets
        would otherwise keep it running for as long as a browser keeps the page open)."""
        app["reaper"].cancel()
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for task in self._starting.values():
            task.cancel()
        await asyncio.gather(self._end(sessions, SHUTDOWN_GRACE_S), self._close_workers())
        _kill_descendants()  # a session that was still starting, or anything a session left behind
        await asyncio.gather(*(asyncio.wait_for(browser.close(code=1001, message=b"the app is shutting down"), 1.0)
                               for browser in list(self._browsers)), return_exceptions=True)

    async def _close_workers(self) -> None:
        if self._workers is not None:
            await self._workers.close()
            self._workers = None
            shutil.rmtree(self._socket_folder, ignore_errors=True)

    async def _on_cleanup(self, app: web.Application) -> None:
        await self._client.close()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)  # the page only sends small requests; data goes by websocket
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def run(self, on_listening: Callable[[int], None] = lambda port: None) -> None:
        """Serves until SIGINT, SIGTERM or SIGHUP; ``on_listening(port)`` is called once the port is bound (a port
        in use raises CoTexNetError before anything is printed or started)."""
        asyncio.run(self._serve(on_listening))

    async def _serve(self, on_listening: Callable[[int], None]) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.application(), handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            raise CoTexNetError(f"cannot listen on {self.host}:{self.port}: {reason} (another `cotexnet app`?); "
                                "choose another --port") from None
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
            loop.add_signal_handler(number, self._on_signal)
        on_listening(runner.addresses[0][1])
        await self._stopping.wait()
        logging.info("stopping: ending every session and worker")
        await runner.cleanup()

    def _on_signal(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            return
        logging.warning("second signal: killing every session and worker now")  # and the shutdown goes on
        _kill_descendants()


def _kill_descendants() -> None:
    """Kills every process this one started, and theirs (sessions, workers, trainings)."""
    import psutil

    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"
