"""Liveness and readiness probes (no auth). ``/healthz`` is liveness only: the process answers. ``/readyz``
reports every part of the server (``corral.domain.readiness``) and is 503 ``not_ready`` while one is down:
the store does not answer, the node's background work stopped, the egress proxy or the resolver do not answer
the supervisor's end-to-end probes (or the proxy has no current policy), or the SSH gateway does not listen."""

from __future__ import annotations

import threading

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from corral.api.deps import AppState, StateDep
from corral.api.schemas import Health, NotReady, PartHealth, Readiness
from corral.domain.readiness import OFF, OK, Part, is_ready, summary
from corral.store.db import ping

router = APIRouter(tags=["health"])

TIMERS_THREAD = "corral-timers"  # services/timers.py: the node's background thread (deadlines, usage)


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


def parts_of(st: AppState) -> dict[str, Part]:
    parts: dict[str, Part] = {}
    try:
        ping(st.engine)
        parts["store"] = OK
    except SQLAlchemyError:
        parts["store"] = Part.down("the database does not answer")
    if st.lifecycle is None:
        parts["node"] = OFF
    elif any(t.name == TIMERS_THREAD and t.is_alive() for t in threading.enumerate()):
        parts["node"] = OK
    else:
        parts["node"] = Part.down("the node's background thread is not running")
    if st.egress is not None:
        parts.update(st.egress.parts())
    elif st.lifecycle is not None and st.settings.network:
        parts["egress"] = parts["resolver"] = Part.down("the egress process is not started")
    else:
        parts["egress"] = parts["resolver"] = OFF
    if st.lifecycle is None or not st.settings.ssh:
        parts["ssh"] = OFF
    else:
        parts["ssh"] = OK if st.ssh is not None else Part.down("the SSH gateway does not listen")
    return parts


def _body(parts: dict[str, Part]) -> dict[str, PartHealth]:
    return {name: PartHealth(status=part.state, detail=part.detail) for name, part in parts.items()}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: every part of the server works",
    responses={503: {"model": NotReady, "description": "A part is down: `parts` says which and why"}},
)
def readyz(st: StateDep) -> Readiness | JSONResponse:
    parts = parts_of(st)
    if not is_ready(parts):
        body = NotReady.model_validate(
            {"error": {"code": "not_ready", "message": summary(parts)}, "parts": _body(parts)}
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return Readiness(status="ready", parts=_body(parts))
