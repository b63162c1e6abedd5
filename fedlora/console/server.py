"""``fedlora console``: a read-only web page over run directories, live.

Why Starlette and uvicorn: routing, static files and streaming responses are
what they do well (and both already come with Flower's stack); fedlora adds
only what is specific to it: who may look (a token), what may be seen (the
views in :mod:`fedlora.console.views`, never training text), and the live
updates (server-sent events when a run's files change).

Secure by default:

* every request needs the access token (``Authorization: Bearer``, the
  ``token`` query parameter once, after which an HttpOnly, SameSite=Strict
  cookie carries it), compared in constant time; otherwise 401;
* only GET and HEAD (405 otherwise): nothing on the page can change a run;
* strict headers on every answer, 401s included: a Content-Security-Policy
  with no inline script, no framing, no referrer (the token never leaks in a
  Referer), no caching;
* run files are served by fixed names only (the plots), never by a path
  taken from the request, and never through a symlink leading out of the run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedlora.console.views import SERVED_FILES, discover, overview, run_view, signature

STATIC = Path(__file__).parent / "static"
COOKIE = "fedlora_console"
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """ASGI middleware: the token, the methods and the headers, on every request."""

    def __init__(self, app: ASGI, token: str) -> None:
        self.app, self.token = app, token

    def _presented(self, scope: Scope) -> tuple[str, bool]:
        """(the token the request carries, whether it came in the query string)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if query:
            return query[0], True
        cookie = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
        return (cookie.value if cookie else ""), False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                raw = [(k, v) for k, v in message.get("headers", []) if k.decode() not in HEADERS]
                message["headers"] = raw + [(k.encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        token, in_query = self._presented(scope)
        response: Response | None = None
        if scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("405: the console is read-only", status_code=405)
        elif not secrets.compare_digest(token.encode(), self.token.encode()):
            response = PlainTextResponse(
                "401: this console needs its access token: open the address it printed "
                "at start (…/?token=…), or send 'Authorization: Bearer <token>'",
                status_code=401,
            )
        elif in_query:  # trade the token in the address bar for a cookie, then drop it
            response = RedirectResponse(scope.get("path", "/"), status_code=303)
            secure = scope.get("scheme") == "https"  # over TLS the cookie never goes plain
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure)
        if response is not None:
            await response(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def build_app(roots: list[Path], token: str, poll_s: float = 1.0) -> ASGI:
    """The console's ASGI app over ``roots`` (run, sweep or parent folders)."""
    if len(token) < 16:
        raise ValueError("console token: use at least 16 characters (or let it be generated)")

    def runs() -> dict[str, Path]:
        return discover(roots)

    def found(request: Request) -> tuple[str, Path]:
        name = request.path_params["name"]
        table = runs()
        if name not in table:
            raise LookupError(name)
        return name, table[name]

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def list_runs(_: Request) -> Response:
        return JSONResponse({"runs": overview(runs())})

    async def one_run(request: Request) -> Response:
        try:
            name, path = found(request)
        except LookupError:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse(run_view(name, path))

    async def events(request: Request) -> Response:
        try:
            name, path = found(request)
        except LookupError:
            return JSONResponse({"error": "no such run"}, status_code=404)

        async def stream() -> AsyncIterator[str]:
            last: tuple[float, ...] | None = None
            idle = 0.0
            while not await request.is_disconnected():
                now = signature(path)
                if now != last:
                    last, idle = now, 0.0
                    yield f"event: run\ndata: {json.dumps(run_view(name, path))}\n\n"
                elif idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll_s)
                idle += poll_s

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def run_file(request: Request) -> Response:
        try:
            _, path = found(request)
        except LookupError:
            return PlainTextResponse("404", status_code=404)
        name = request.path_params["file"]
        if name not in SERVED_FILES:
            return PlainTextResponse("404: only the run's plots are served", status_code=404)
        target = path / name
        if target.is_symlink() or not target.is_file():
            return PlainTextResponse("404", status_code=404)
        if not target.resolve().is_relative_to(path.resolve()):
            return PlainTextResponse("404", status_code=404)
        return FileResponse(target, media_type="image/png")

    return Guard(
        Starlette(
            routes=[
                Route("/", index),
                Route("/api/runs", list_runs),
                Route("/api/runs/{name}", one_run),
                Route("/api/runs/{name}/events", events),
                Route("/runs/{name}/files/{file}", run_file),
                Mount("/static", StaticFiles(directory=STATIC, follow_symlink=False)),
            ]
        ),
        token,
    )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    roots: list[Path],
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the console until interrupted; prints its address with the token once."""
    import uvicorn

    if host not in LOOPBACK and not (certfile and keyfile):
        raise ValueError(
            f"--host {host}: the console leaves this machine only over TLS; give "
            "--certfile and --keyfile (make them with `fedlora certs`), or keep the "
            "default --host 127.0.0.1"
        )
    token = token or secrets.token_urlsafe(24)
    scheme = "https" if certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    announce(f"fedlora console: {scheme}://{shown}:{port}/?token={token}")
    announce("(read-only; the token is printed only here; Ctrl-C stops it)")
    uvicorn.run(
        build_app(roots, token),
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
