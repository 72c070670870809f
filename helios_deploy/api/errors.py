"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import UserError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error"}
# StreamError codes (runtime/live.py, api/backends.py) -> HTTP status
STREAM_STATUS = {"over_capacity": 429, "not_found": 404, "finished": 409, "unsupported": 400,
                 "store_unavailable": 503}  # the job store's StoreError (api/jobs.py)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None,
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status, headers=headers)


def from_user_error(e: UserError) -> ApiError:
    """A runtime UserError (bad request) or StreamError (capacity, unknown stream) as an ApiError."""
    code = getattr(e, "code", None)
    return ApiError(STREAM_STATUS.get(code, 400), e.render(), code or "invalid_request")


def install(app) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return response(e.status, e.message, e.code, e.param, headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, e: UserError):
        a = from_user_error(e)
        return response(a.status, a.message, a.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return response(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return response(e.status_code, str(e.detail), {404: "not_found", 405: "method_not_allowed"}.get(e.status_code))
