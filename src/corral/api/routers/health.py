"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from corral.api.deps import StateDep
from corral.api.errors import error_response
from corral.api.schemas import ErrorEnvelope, Health
from corral.store.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: the database answers",
    responses={503: {"model": ErrorEnvelope, "description": "The database does not answer"}},
)
def readyz(st: StateDep) -> Health | JSONResponse:
    try:
        ping(st.engine)
    except SQLAlchemyError:
        return error_response(503, "not_ready", "The database does not answer")
    return Health(status="ready")
