"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Handlers installed by `install_error_handlers` turn every failure of a request into that shape:
an APIError raised on purpose, FastAPI's own 404/405 for unknown paths, and (logged, as a 500) an
unexpected exception, so a client always gets a JSON error it can read.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger("martlet")

# status -> the OpenAI error type
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """A request that cannot be served: the HTTP status and what the client sees."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request, exc: HTTPException):
        message = {404: f"Unknown path {request.url.path}.", 405: f"Method {request.method} is not allowed on "
                                                                      f"{request.url.path}."}
        error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request, exc: RequestValidationError):  # routes read bodies themselves; a guard
        return JSONResponse(bad_request(str(exc)).body(), status_code=400)

    async def unexpected(request, exc: Exception):
        logger.exception("request %s %s failed", request.method, request.url.path)
        error = APIError(500, f"The server failed to answer: {type(exc).__name__}: {exc}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
