"""Error rendering shared by the device API and the control API.

Every :class:`~fedscaled.errors.FedError` becomes ``{"error": {"code", "message"}}`` with its HTTP
status; aiohttp's own HTTP errors (404 route, 405, 413) get the same shape; anything else is logged
and answered 500 ``internal_error`` without details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fedscaled.errors import BadRequest, FedError, PayloadTooLarge

log = logging.getLogger("fedscaled.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: dict[str, object] | None = None) -> web.Response:
    """A JSON error response in the catalog's shape."""
    body: dict[str, object] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return web.Response(status=status, text=json.dumps({"error": body}), content_type="application/json",
                        headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error raised by a handler in one place."""
    try:
        return await handler(request)
    except FedError as exc:
        headers = {"Retry-After": str(exc.details["retry_after"])} if "retry_after" in exc.details else None
        return error_response(exc.status, exc.code, exc.message, headers, exc.details or None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason or code)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the daemon log")


async def json_object(request: web.Request, limit: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest (or PayloadTooLarge past ``limit``) otherwise."""
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"JSON bodies are limited to {limit} bytes")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body
