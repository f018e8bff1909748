"""JSON responses and the error form every failure takes."""

from __future__ import annotations

import json
from typing import Any

from quart import Response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, code: str, detail: str) -> Response:
    """CONTRACT.md's error form: ``{"error": <short code>, "detail": <what to do>}``."""
    return json_response({"error": code, "detail": detail}, status=status)
