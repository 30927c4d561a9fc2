"""The OpenAPI document, as FastAPI builds it, corrected to say what the API really does."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from corral.api import idempotency

_ERROR_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}


def build(app: FastAPI) -> dict[str, Any]:
    """- bearer auth is declared, and required by every operation that can answer 401;
    - FastAPI's default 422 (its own ``HTTPValidationError`` shape) is dropped: operations with a body declare
      422 ``validation_error`` themselves, and bad parameters answer 400 ``invalid_parameter``."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer corral_live_...`",
    }
    for operations in schema.get("paths", {}).values():
        for op in operations.values():
            responses = op.get("responses", {})
            default_422 = responses.get("422", {})
            if "HTTPValidationError" in str(default_422):
                del responses["422"]
            if op.get("parameters") and "400" not in responses:
                responses["400"] = {
                    "description": "Bad request: a bad query or path parameter",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
            if "401" in responses:
                op["security"] = [{"bearer": []}]
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    idempotency.document(schema)
    app.openapi_schema = schema
    return schema
