"""The operators' HTTP API and the dashboard page, served by the gateway process.

Every ``/api/`` route needs a bearer token from ``api.tokens`` (the environment's
``STREETBRAIN_API__TOKENS``); reads need the viewer role, lifecycle actions dispatcher, silences and
the configuration admin. The actor recorded in the audit trail is the token's operator, never a
field the client sends. ``/``, ``/healthz``, ``/readyz`` and ``/metrics`` need no token. Errors are
JSON: ``{"error": "...", "detail": ...}``.
"""

# No `from __future__ import annotations` here: FastAPI reads these annotations at run time, and
# the role dependencies are local to create_app.
import asyncio
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Iterator, Literal

import orjson
import swagger_ui_bundle
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.config import Operator
from gateway.incidents import lifecycle
from gateway.incidents.queue import NotFound
from gateway.incidents.sla import SEVERITY_ORDER

if TYPE_CHECKING:
    from gateway.service import Gateway

STATIC = Path(__file__).with_name("static")
ROLES = {"viewer": 0, "dispatcher": 1, "admin": 2}
SSE_KEEPALIVE_S = 15.0


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=2000)
    team: str | None = Field(default=None, max_length=64)
    member: str | None = Field(default=None, max_length=64)


class SilenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = Field(default=None, max_length=64)
    rule: str | None = Field(default=None, max_length=64)
    site: str | None = Field(default=None, max_length=64)
    until: float | None = Field(default=None, description="epoch seconds")
    for_s: float | None = Field(default=None, gt=0, le=30 * 86400)
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one_end(self) -> "SilenceBody":
        if (self.until is None) == (self.for_s is None):
            raise ValueError("give either until (epoch seconds) or for_s (seconds)")
        return self


class ApiServer(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns SIGINT and SIGTERM."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_app(gateway: "Gateway") -> FastAPI:
    app = FastAPI(title="streetbrain", version="0.1.0", docs_url=None, redoc_url=None,
                  description="The street command centre's API: incidents and their lifecycle, devices and their "
                              "readings, the live alert stream, silences, health and metrics.")
    # The OpenAPI page from Swagger UI files shipped in a package: the command centre may have no internet.
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="streetbrain API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
    bearer = HTTPBearer(auto_error=False)

    def operator(role: str) -> Any:
        def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                  token: Annotated[str | None, Query(include_in_schema=False)] = None) -> Operator:
            # EventSource cannot send headers: the stream may carry its token as ?token=
            given = credentials.credentials if credentials is not None else token
            found = gateway.config.api.tokens.get(given or "")
            if found is None:
                raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
            if ROLES[found.role] < ROLES[role]:
                raise HTTPException(403, f"{found.operator} is a {found.role}; this needs {role}")
            return found
        return check

    viewer, dispatcher, admin = operator("viewer"), operator("dispatcher"), operator("admin")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(problems), "detail": problems}, status_code=422)

    # -- no token -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        receiver = gateway.receiver
        ready = gateway.started.is_set() and receiver is not None and receiver.connected.is_set()
        # the smoke hint lane is not needed to be ready (the bulk session carries every message), only shown
        lane = receiver.lane if receiver is not None else None
        return JSONResponse({"ready": ready, "broker": str(gateway.address),
                             "smoke_hint_lane": None if lane is None else lane.connected.is_set()},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        registry = CollectorRegistry()
        registry.register(gateway.stats)
        registry.register(_IncidentCollector(await gateway.in_store(gateway.incidents.sla_figures, time.time())))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # -- incidents --------------------------------------------------------------------------------------
    @app.get("/api/incidents", tags=["incidents"])
    async def list_incidents(
        _: Annotated[Operator, Depends(viewer)],
        state: Literal["new", "acknowledged", "dispatched", "on_site", "resolved", "closed"] | None = None,
        kind: Literal["smoke", "ev_charger", "noise", "meter"] | None = None,
        site: str | None = None, severity: Literal["info", "warning", "major", "critical"] | None = None,
        open: bool = False, overdue: bool = False, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[dict[str, Any]]:
        return await gateway.in_store(gateway.incidents.list, state=state, kind=kind, site=site, severity=severity,
                                      open_only=open, overdue_at=time.time() if overdue else None, limit=limit)

    @app.get("/api/incidents/{incident_id}", tags=["incidents"])
    async def get_incident(incident_id: str, _: Annotated[Operator, Depends(viewer)]) -> dict[str, Any]:
        try:
            return await gateway.in_store(gateway.incidents.get, incident_id)
        except NotFound:
            raise HTTPException(404, f"no incident {incident_id!r}") from None

    @app.post("/api/incidents/{incident_id}/{action}", tags=["incidents"])
    async def act(incident_id: str, action: Literal["ack", "dispatch", "reassign", "arrive", "resolve", "close",
                                                    "reopen", "comment"],
                  who: Annotated[Operator, Depends(dispatcher)], body: ActionBody | None = None) -> dict[str, Any]:
        body = body or ActionBody()
        try:
            change = await gateway.in_store(gateway.incidents.act, incident_id, action, who.operator, note=body.note,
                                            team=body.team, member=body.member)
        except NotFound:
            raise HTTPException(404, f"no incident {incident_id!r}") from None
        except lifecycle.TransitionError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        gateway.poke_publisher()
        return change.to_dict()

    # -- silences -----------------------------------------------------------------------------------------
    @app.get("/api/silences", tags=["silences"])
    async def list_silences(_: Annotated[Operator, Depends(viewer)]) -> list[dict[str, Any]]:
        return await gateway.in_store(gateway.incidents.silences)

    @app.post("/api/silences", tags=["silences"], status_code=201)
    async def add_silence(body: SilenceBody, who: Annotated[Operator, Depends(admin)]) -> dict[str, Any]:
        ends_at = body.until if body.until is not None else time.time() + (body.for_s or 0)
        try:
            return await gateway.in_store(gateway.incidents.silence, who.operator, body.reason, ends_at,
                                          device_id=body.device_id, rule=body.rule, site=body.site)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    # -- devices and alerts -------------------------------------------------------------------------------
    @app.get("/api/devices", tags=["devices"])
    async def devices(_: Annotated[Operator, Depends(viewer)],
                      kind: Literal["smoke", "ev_charger", "noise", "meter"] | None = None,
                      site: str | None = None) -> list[dict[str, Any]]:
        return gateway.device_views(kind=kind, site=site)

    @app.get("/api/devices/{device_id}/readings", tags=["devices"])
    async def readings(device_id: str, _: Annotated[Operator, Depends(viewer)],
                       limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> dict[str, Any]:
        if device_id not in gateway.registry.devices:
            raise HTTPException(404, f"no device {device_id!r}")
        return {"device_id": device_id, "readings": gateway.recent_readings(device_id, limit)}

    @app.get("/api/alerts", tags=["alerts"])
    async def recent_alerts(_: Annotated[Operator, Depends(viewer)],
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        return list(gateway.recent_alerts)[-limit:][::-1]

    @app.get("/api/alerts/stream", tags=["alerts"])
    async def alert_stream(request: Request, _: Annotated[Operator, Depends(viewer)]) -> StreamingResponse:
        """Server-Sent Events: ``event: alert`` and ``event: incident``, newest as they happen."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        gateway.alert_listeners.append(queue)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b": streetbrain alert stream\n\n"
                while not await request.is_disconnected():
                    try:
                        item = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    kind = "incident" if "change" in item else "alert"
                    yield b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(item) + b"\n\n"
            finally:
                gateway.alert_listeners.remove(queue)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the street and the configuration -----------------------------------------------------------------
    @app.get("/api/street", tags=["street"])
    async def street(who: Annotated[Operator, Depends(viewer)]) -> dict[str, Any]:
        """Sites, teams and severities the dashboard draws; and who is asking."""
        return {"operator": who.operator, "role": who.role,
                "sites": [s.model_dump() for s in gateway.config.sites],
                "teams": [t.model_dump() for t in gateway.config.teams],
                "severities": list(SEVERITY_ORDER)}

    @app.get("/api/config", tags=["street"])
    async def config(_: Annotated[Operator, Depends(admin)]) -> dict[str, Any]:
        """The running configuration, secrets left out."""
        data = gateway.config.model_dump(mode="json", exclude={"devices", "api"})
        data["broker"].pop("password", None)
        data["influx"].pop("token", None)
        data["api"] = {"listen": gateway.config.api.listen, "operators": len(gateway.config.api.tokens)}
        data["devices"] = len(gateway.config.devices)
        return data

    return app


class _IncidentCollector:
    """Incident SLA figures for /metrics, computed at scrape time."""

    def __init__(self, figures: dict[str, Any]):
        self.figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("streetbrain_incidents", "Incidents by state", labels=["state"])
        for state, n in self.figures["by_state"].items():
            by_state.add_metric([state], n)
        yield by_state
        overdue = GaugeMetricFamily("streetbrain_incidents_overdue", "Open incidents with a clock past its deadline")
        overdue.add_metric([], self.figures["overdue"])
        yield overdue
