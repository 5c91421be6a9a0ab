"""The live web dashboard: ``fleet serve --dashboard-port`` (the fleet page) and
``fleet swarm --web`` (the run page).

Served by aiohttp on an event loop of its own thread; pages update from server-sent events
(``/api/stream/<page>``, one JSON snapshot a second). Every asset comes with the installed
packages: our pages from ``fleet/controlplane/web/``, the charts' plotly.js from the ``plotly``
package (no CDN). Snapshots that read the registry are computed on a worker thread, at most
once a second whoever asks, so a dashboard never stalls the loop or the control plane.

Endpoints (JSON, ``GET`` only): ``/api/fleet`` (inventory counts, expiry timeline, handshake
outcomes over time, connections by tier and env, the revocation panel, alerts),
``/api/devices?q=&state=&tier=&env=&issuer=&limit=`` (inventory search), ``/api/swarm``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from fleet.controlplane.event_feed import EventFeed
from fleet.controlplane.fleet_view import DeviceQuery, FleetView
from fleet.controlplane.swarm_feed import SwarmFeed
from fleet.kernel.errors import UsageError

log = logging.getLogger("mtls_fleet.dashboard")

STREAM_EVERY = 1.0
MAX_STREAMS = 32
_ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
Snapshot = Callable[[], dict[str, Any]]


def plotly_js() -> Path:
    """plotly.min.js as the ``plotly`` package installs it."""
    path = Path(str(resources.files("plotly").joinpath("package_data/plotly.min.js")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plotly package carries no plotly.min.js")
    return path


class FleetPage:
    """The fleet page's data: the workspace view, the broker's events and the alerts."""

    def __init__(
        self,
        view: FleetView,
        events: EventFeed | None,
        alerts: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.view = view
        self.events = events
        self.alerts = alerts

    def snapshot(self) -> dict[str, Any]:
        records = self.view.devices()
        inventory = self.view.inventory(DeviceQuery(limit=1), records)
        del inventory["devices"], inventory["matching"]
        events = self.events
        return {
            "inventory": inventory,
            "expiry": self.view.expiry(records),
            "revocation": self.view.revocation(events.cut_times() if events else {}, records),
            "outcomes": events.outcomes() if events else None,
            "connections": events.connections() if events else None,
            "events": {"received": events.received, "malformed": events.malformed}
            if events
            else None,
            "alerts": self.alerts() if self.alerts else [],
        }


class _Cached:
    """A snapshot computed at most once per ``every`` seconds, off the event loop."""

    def __init__(self, compute: Snapshot, every: float = STREAM_EVERY) -> None:
        self._compute = compute
        self.every = every
        self._value: bytes | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> bytes:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.every:
                try:
                    value = await asyncio.to_thread(self._compute)
                except Exception as exc:  # shown on the page; the next second tries again
                    log.exception("dashboard snapshot failed")
                    value = {"error": f"cannot read the fleet now: {exc}"}
                self._value = json.dumps(value).encode()
                self._at = time.monotonic()
            return self._value


class Dashboard:
    """Serves the fleet page, the swarm page, or both, on ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8088,
        fleet: FleetPage | None = None,
        swarm: SwarmFeed | None = None,
    ) -> None:
        if fleet is None and swarm is None:
            raise UsageError("a dashboard needs the fleet page, the swarm page or both")
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.fleet = fleet
        self.swarm = swarm
        self._streams = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dashboard", daemon=True
        )
        self._runner: web.AppRunner | None = None
        self._snapshots: dict[str, _Cached] = {}
        if fleet is not None:
            self._snapshots["fleet"] = _Cached(fleet.snapshot)
        if swarm is not None:
            self._snapshots["swarm"] = _Cached(swarm.snapshot, every=0.5)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and serve (OSError if the port is taken)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.port = future.result(30)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise

    async def _start(self) -> int:
        app = web.Application(client_max_size=1024, handler_args={"max_field_size": 8190})
        app.router.add_get("/", self._index)
        app.router.add_get("/fleet", self._page("fleet"))
        app.router.add_get("/swarm", self._page("swarm"))
        app.router.add_get("/static/plotly.min.js", self._plotly)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/fleet", self._json("fleet"))
        app.router.add_get("/api/swarm", self._json("swarm"))
        app.router.add_get("/api/devices", self._devices)
        app.router.add_get("/api/stream/{page}", self._stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port, reuse_address=True)
        await site.start()
        self._runner = runner
        return int(runner.addresses[0][1])

    def stop(self, *, grace: float = 0.0) -> None:
        """Stop serving; with ``grace``, open live pages first get up to that long to read the
        latest snapshot (a finished run's)."""
        if grace > 0 and self._streams > 0:
            time.sleep(grace)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- handlers ---------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/fleet" if self.fleet is not None else "/swarm")

    def _page(self, page: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if page not in self._snapshots:
                raise web.HTTPNotFound(text=f"no {page} page here")
            text = _web_file(f"{page}.html")
            return web.Response(text=text, content_type="text/html", headers=_NO_CACHE)

        return handler

    async def _plotly(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            plotly_js(),
            headers={"Content-Type": "text/javascript", "Cache-Control": "max-age=86400"},
        )

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _ASSETS:
            raise web.HTTPNotFound(text="no such asset")
        return web.Response(text=_web_file(name), content_type=_ASSETS[name], headers=_NO_CACHE)

    def _json(self, page: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            cached = self._snapshots.get(page)
            if cached is None:
                raise web.HTTPNotFound(text=f"no {page} page here")
            body = await cached.get()
            return web.Response(body=body, content_type="application/json", headers=_NO_CACHE)

        return handler

    async def _devices(self, request: web.Request) -> web.StreamResponse:
        if self.fleet is None:
            raise web.HTTPNotFound(text="no fleet page here")
        if len(request.query) > 6:
            return _bad_request("at most 6 parameters")
        try:
            query = DeviceQuery.from_params(dict(request.query))
        except UsageError as exc:
            return _bad_request(str(exc))
        result = await asyncio.to_thread(self.fleet.view.inventory, query)
        return web.json_response(result, headers=_NO_CACHE)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the page's snapshot once a second until the client leaves."""
        cached = self._snapshots.get(request.match_info["page"])
        if cached is None:
            raise web.HTTPNotFound(text="no such page here")
        if self._streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_STREAMS} live pages at once")
        self._streams += 1
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            while True:
                body = await cached.get()
                await response.write(b"data: " + body + b"\n\n")
                await asyncio.sleep(cached.every)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("dashboard stream failed")
        finally:
            self._streams -= 1
        return response


_NO_CACHE = {"Cache-Control": "no-cache"}


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)


def _web_file(name: str) -> str:
    return resources.files("fleet.controlplane").joinpath(f"web/{name}").read_text("utf-8")
