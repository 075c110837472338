"""One error shape for every refusal, OpenAI's: `{"error": {"message", "type", "code", "param"}}`, so the official
client raises its typed errors with our message. `code` is a short stable slug a client can branch on."""

from __future__ import annotations

import json

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An expected refusal: HTTP status, stable code, a message naming the problem, extra headers."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "error"), "code": self.code,
                          "param": self.param}}


async def send_error(send, error: ApiError) -> None:
    """Answer from ASGI middleware, before any app code runs."""
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *[(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
