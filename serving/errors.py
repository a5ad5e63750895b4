"""Typed errors and the one mapper that turns them (and FastAPI's own) into the OpenAI error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client can act on; ``status`` and ``type`` follow OpenAI's conventions."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(APIError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    status, code = 409, "conflict"


class PayloadTooLarge(APIError):
    status, code = 413, "payload_too_large"


class Overloaded(APIError):
    status, type, code = 429, "rate_limit_error", "overloaded"


class Unavailable(APIError):
    status, type, code = 503, "service_unavailable", "not_ready"


def _error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return 400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first["msg"] + (f" (at {param})" if param else "")
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more problem(s)"
    return 422, message, param


class DeclaredBodyLimit:
    """Refuse a body whose Content-Length is over the limit in OpenAI's error shape, before reading it.

    FastAPI's ``max_body_size`` enforces the limit on the bytes actually received (chunked bodies too), but
    answers a declared oversize with plain text; this runs first so clients always get the JSON shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if scope["type"] == "http" and declared.isdigit() and int(declared) > self.max_bytes:
            error = PayloadTooLarge(f"request body is {int(declared)} bytes; at most {self.max_bytes} are accepted")
            return await _error_response(error.status, error.body())(scope, receive, send)
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = _describe_validation(exc)
        return _error_response(status, BadRequest(message, param=param).body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, error.body(), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        body = ErrorResponse(error=ErrorDetail(message="internal error", type="server_error")).model_dump()
        return _error_response(500, body)
