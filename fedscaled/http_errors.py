"""Error rendering shared by the device API and the control API.

Every :class:`~fedscaled.errors.FedError` becomes ``{"error": {"code", "message"}}`` with its HTTP
status; aiohttp's own HTTP errors (404 route, 405, 413) get the same shape; anything else is logged
and answered 500 ``internal_error`` without details.
"""

from __future__ import annotations

import json
import logging
import re
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


# Bounds on untrusted JSON, checked while parsing: nesting (json's recursion would otherwise raise
# RecursionError), integer length (int() of a 5,000-digit string raises, and huge ints poison arithmetic)
# and strings that are not valid Unicode (a lone surrogate cannot be encoded again).
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 24


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _check_tree(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        value.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_tree(v, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, depth + 1)


# Bodies with a run of more than MAX_INT_DIGITS digits anywhere (a long integer, or a long number in a
# string) go through a decoder that bounds each integer's digits; every other body is parsed by the C scanner
# alone, which calls back into Python for every integer when given a hook (measured: the hook decoder was
# ~5 % of a check-in's CPU).
_LONG_DIGITS = re.compile(rf"\d{{{MAX_INT_DIGITS + 1}}}")
_BOUNDED_DECODER = json.JSONDecoder(parse_int=_parse_int)
_PLAIN_DECODER = json.JSONDecoder()


def loads_bounded(text: str | bytes) -> Any:
    """``json.loads`` for untrusted input: ValueError (never RecursionError) past the bounds above."""
    from_utf8 = isinstance(text, bytes | bytearray)
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    try:
        # NaN and Infinity parse (as Python does) and are refused by the field validators, which name the field.
        decoder = _BOUNDED_DECODER if _LONG_DIGITS.search(text) else _PLAIN_DECODER
        value = decoder.decode(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    # The tree walk finds what the parser lets through: lone surrogates and nesting past the bound. Text decoded
    # from UTF-8 holds a surrogate only through a \u escape, and nesting needs as many brackets: without
    # either (a check-in body, say) the walk cannot find anything, and it is skipped (it was ~5 % of a check-in).
    if not from_utf8 or "\\u" in text or text.count("{") + text.count("[") > MAX_JSON_DEPTH:
        _check_tree(value)
    return value


async def json_object(request: web.Request, limit: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest (or PayloadTooLarge past ``limit``) otherwise."""
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"JSON bodies are limited to {limit} bytes")
    raw = await request.read()
    try:
        body = loads_bounded(raw)
    except (ValueError, UnicodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body
