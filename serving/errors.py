"""Typed errors and the one mapper that turns them (the engine's and FastAPI's too) into the OpenAI error shape;
and the ASGI middleware that keeps a refused or abandoned request readable and quiet."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.engine_errors import EngineError, EngineFull, EngineStopped, InvalidRequest, UnknownAdapter
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


def engine_error(exc: EngineError) -> APIError:
    """What a client is told when the engine refuses or ends its request (at submission or mid-stream)."""
    if isinstance(exc, EngineFull):
        return Overloaded("The server is at capacity; retry shortly.", headers={"Retry-After": "1"})
    if isinstance(exc, UnknownAdapter):  # unloaded between routing and submission
        return ModelNotFound(f"{exc}; GET /v1/models lists the servable ones.", param="model")
    if isinstance(exc, InvalidRequest):
        return BadRequest(str(exc))
    if isinstance(exc, EngineStopped):
        return Unavailable("The model is not serving (the engine stopped); retry on another replica.")
    return APIError(str(exc))


class _ErrorJSON(JSONResponse):
    """Non-ASCII escaped: a message that quotes the client's input (a model name, a chat template's complaint)
    always encodes, whatever it holds."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return _ErrorJSON(body, status_code=status, headers=headers)


def _is_union_tag(part: object) -> bool:
    """pydantic locates the error of each type of a union under a tag naming the type ("str", "list[TextPart]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str | None]:
    # the deepest error first: of a union's types, it names the one the value came closest to
    errors = sorted(exc.errors(), key=lambda error: -len(error.get("loc", ())))
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return 400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
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


class DrainUnreadBody:
    """Read what is left of a request body before answering, up to ``max_bytes``, so the client sees the answer.

    A server that answers (a 413, a 404) before reading the body and then closes the connection, as uvicorn does
    for ``Connection: close`` and HTTP/1.0, leaves unread bytes in the socket: the kernel then resets the
    connection, and a client still sending its body gets the reset instead of the answer. A body larger than
    ``max_bytes`` is not drained (the client may then see the reset). A client that asked ``Expect:
    100-continue`` and was never read from has sent nothing, and is answered at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"")
        state = {"unread": declared != b"0" and (declared.isdigit() or b"transfer-encoding" in headers),
                 "asked": False}

        async def tracked_receive() -> Message:
            state["asked"] = True
            message = await receive()
            state["unread"] = message["type"] == "http.request" and message.get("more_body", False)
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and state["unread"]:
                waiting = headers.get(b"expect", b"").lower() == b"100-continue" and not state["asked"]
                if not waiting and not (declared.isdigit() and int(declared) > self.max_bytes):
                    await _discard_body(receive, self.max_bytes)
                state["unread"] = False
            await send(message)

        await self.app(scope, tracked_receive, draining_send)


async def _discard_body(receive: Receive, max_bytes: int) -> None:
    seen = 0
    while seen <= max_bytes:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class ClientGone:
    """A client that went away mid-request is routine: one INFO line, not an ASGI application error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            log.info("client disconnected before the answer to %s %s", scope.get("method"), scope.get("path"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        error = engine_error(exc)
        return _error_response(error.status, error.body(), error.headers)

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
