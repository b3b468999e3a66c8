"""The HTTP face of the judge: FastAPI routes, the auth and body-size guard, and error shapes.

`create_fastapi_app(get_service)` builds the app around a function that returns the `JudgeService`
(in Serve: the ingress replica's; in unit tests: one over a fake backend). Every error is JSON
`{"error": {"message", "type", "code"}}` as OpenAI clients expect; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from themis_ray.serve.schemas import ChatCompletionBody, JudgeBody
from themis_ray.serve.service import APIError, JudgeService, ServeSettings, error_body, key_matches

log = logging.getLogger(__name__)

# Open without a key: liveness, and the schema (it describes the API, it holds no data).
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestGuard:
    """Pure ASGI middleware: bearer keys first (401), then the body-size limit (413).

    The body is buffered here up to the limit, so an oversized body is refused before any JSON parsing
    and a body without Content-Length (chunked) cannot slip past.
    """

    def __init__(self, app, get_settings: Callable[[], ServeSettings]):
        self.app = app
        self.get_settings = get_settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.get_settings()
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        if settings.api_key_digests and path not in OPEN_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip() or not key_matches(key.strip(), settings.api_key_digests):
                return await _send_json(
                    send, 401, error_body(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          "authentication_error", "invalid_api_key"),
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )

        if scope.get("method", "GET") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = settings.max_request_bytes
        too_large = error_body(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await _send_json(send, 400, error_body(400, "invalid Content-Length header"))
            if int(declared) > limit:
                return await _send_json(send, 413, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _send_json(send, 413, too_large)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return buffered
            return await receive()  # after the body: wait for the disconnect, as a server would

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, payload: dict, extra_headers=()):
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(status: int, message: str, type: str = "invalid_request_error", code=None, headers=None):
    return JSONResponse(error_body(status, message, type, code), status_code=status, headers=headers)


def _describe(errors) -> tuple[int, str]:
    """Pydantic/FastAPI errors -> (status, one readable line). Malformed JSON is 400, the rest 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"malformed JSON body{': ' + str(detail) if detail else ''}"
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return 422, "; ".join(parts) or "invalid request body"


def create_fastapi_app(get_service: Callable[[], JudgeService]) -> FastAPI:
    app = FastAPI(
        title="Themis judge",
        description="An LLM-as-a-judge served by Ray Serve: /v1/judge, and OpenAI-compatible chat completions.",
        version="1",
    )
    app.add_middleware(RequestGuard, get_settings=lambda: get_service().settings)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, message = _describe(exc.errors())
        return _error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(500, f"internal error ({type(exc).__name__})", "server_error")

    @app.get("/healthz")
    async def healthz(service: JudgeService = Depends(get_service)) -> dict:
        return {"status": "ok", "model": service.settings.model_id}

    @app.get("/v1/models")
    async def models(service: JudgeService = Depends(get_service)) -> dict:
        return service.models()

    @app.post("/v1/judge")
    async def judge(body: JudgeBody, service: JudgeService = Depends(get_service)) -> dict:
        """Grade one response (single, reference) or compare two (pairwise, judged in both orders).

        Without `scenario`, the classifier picks one (`scenario_source: "classifier"`, with
        `scenario_confidence`). A 200 whose `error` is set means the model's answer could not be
        parsed: pointwise, `score` is null (`score_distribution`/`expected_score`, read from the
        score token's log-probabilities, may still be there); pairwise, an order without a verdict
        counts as a tie, so `verdict` is "C" with `consistent: false`. `raw` holds what the model
        wrote. Invalid input is a 4xx; a prompt too long for the model is a 400.
        """
        return await service.judge(body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionBody, service: JudgeService = Depends(get_service)):
        result = await service.chat(body)
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return app
