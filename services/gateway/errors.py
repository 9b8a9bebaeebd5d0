"""Errors as OpenAI-style JSON bodies, and the handlers that turn our exceptions into them (never a 500)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .auth import AuthError
from .inference import RequestError


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   retry_after: float | None = None, **detail: object) -> JSONResponse:
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **detail}}, status_code=status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return error_response(e.status, e.message, retry_after=e.retry_after)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, e: AuthError):
        kind = "rate_limit_error" if e.status == 429 else "authentication_error" if e.status == 401 else "permission_error"
        return error_response(e.status, e.message, kind, e.retry_after)
