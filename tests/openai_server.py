"""A small, real OpenAI-compatible HTTP server for tests: `POST /v1/chat/completions`, `GET /v1/models`.

It runs in a thread on 127.0.0.1 (an ephemeral port by default), so Ray actors on any node of a local
cluster can reach it. Every answer is a well-formed chat completion; by default a judge's answer
("[[4]] ..."). Knobs, all optional:

* `latency_s`: seconds each answer takes (the request holds its concurrency slot meanwhile);
* `max_concurrency`: requests served at once; one more gets HTTP 429 with `Retry-After`;
* `fail_first`: the first N requests of every distinct prompt get HTTP 500 (retries then succeed);
* `fail_rate` / `malformed_rate`: a random share of requests gets HTTP 500 / a 200 whose body is
  not JSON (seeded, so a run is repeatable);
* `answer`: a function from the request's messages to the reply's text.
* `rate_limit_rate`: a random share gets HTTP 429 with `Retry-After: retry_after_s`;
* `hang_rate`: a random share is held `hang_s` seconds and then dropped with a 500 (a client whose
  timeout is shorter has given up by then: the request never counts as answered);
* `garbage_rate`: a random share gets a well-formed 200 whose text is `garbage_text` (no score);
* `rate_limit_first`: the first N requests of every distinct prompt get HTTP 429 with
  `Retry-After: retry_after_s`;
* `fail_after`: every request after the first N (all prompts together) gets HTTP 500: an endpoint
  that went down;
* `api_key`: a request without `Authorization: Bearer <api_key>` gets HTTP 401.

It counts what it saw, per distinct prompt (the last user message): `requests` (every attempt) and
`answered` (the 200s with a valid body), so a test can assert each record was labelled exactly once;
`max_in_flight` is the highest number of requests it held at once; `arrivals` lists every request as
(the server's monotonic clock when it arrived, its prompt key, the status it got), so a test times the
client's waits by the server's clock.

    with OpenAIServer(latency_s=0.2) as server:
        EngineConfig(kind="openai", base_url=server.base_url, model="teacher")
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

Messages = list[dict]


def judge_answer(messages: Messages) -> str:
    """A valid single-answer evaluation: an overall score, then an explanation."""
    return "[[4]] The response answers the question correctly and clearly; it could say a little more."


def prompt_key(messages: Messages) -> str:
    """What identifies a record: its last user message (the rendered evaluation prompt)."""
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    content = users[-1] if users else json.dumps(messages, sort_keys=True)
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True)


class OpenAIServer:
    def __init__(self, latency_s: float = 0.0, max_concurrency: Optional[int] = None, fail_first: int = 0,
                 fail_rate: float = 0.0, malformed_rate: float = 0.0, answer: Callable[[Messages], str] = judge_answer,
                 host: str = "127.0.0.1", port: int = 0, seed: int = 0, rate_limit_rate: float = 0.0,
                 retry_after_s: float = 0.2, hang_rate: float = 0.0, hang_s: float = 2.0, garbage_rate: float = 0.0,
                 garbage_text: str = "I would rather not grade this one.", fail_after: Optional[int] = None,
                 api_key: Optional[str] = None, log_path: Optional[str] = None, rate_limit_first: int = 0):
        self.latency_s, self.max_concurrency = latency_s, max_concurrency
        self.rate_limit_rate, self.retry_after_s = rate_limit_rate, retry_after_s
        self.hang_rate, self.hang_s = hang_rate, hang_s
        self.garbage_rate, self.garbage_text = garbage_rate, garbage_text
        self.fail_after, self.api_key = fail_after, api_key
        self.rate_limit_first = rate_limit_first
        self.arrivals: list[tuple[float, str, int]] = []
        self.total_requests = self.unauthorized = 0
        self.faults: collections.Counter[str] = collections.Counter()  # fault kind -> times injected
        self.fail_first, self.fail_rate, self.malformed_rate = fail_first, fail_rate, malformed_rate
        self.answer = answer
        self.requests: collections.Counter[str] = collections.Counter()
        self.answered: collections.Counter[str] = collections.Counter()
        self.in_flight = self.max_in_flight = self.rejected = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        # One line per answered request (a digest of its prompt), flushed at once: the log outlives a
        # client that is killed, so a test can count what was paid for across runs.
        self._log = open(log_path, "a", buffering=1) if log_path else None
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what one request gets ----------------------------------------------------------------------
    def _admit(self, key: str) -> Optional[str]:
        """Count the request and take a slot; returns the fault to answer with, or None."""
        with self._lock:
            self.requests[key] += 1
            self.total_requests += 1
            if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
                self.rejected += 1
                return "busy"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.fail_after is not None and self.total_requests > self.fail_after:
                return self._fault("down")
            if self.requests[key] <= self.rate_limit_first:
                return self._fault("rate_limited")
            if self.requests[key] <= self.fail_first or self._random.random() < self.fail_rate:
                return self._fault("error")
            if self._random.random() < self.malformed_rate:
                return self._fault("malformed")
            # Drawn only when asked for, so the draws above stay as they were for existing seeds.
            for kind, rate in (("rate_limited", self.rate_limit_rate), ("hang", self.hang_rate),
                               ("garbage", self.garbage_rate)):
                if rate and self._random.random() < rate:
                    return self._fault(kind)
        return None

    def _fault(self, kind: str) -> str:
        self.faults[kind] += 1
        return kind

    def _release(self, key: Optional[str] = None) -> None:
        with self._lock:
            self.in_flight -= 1
            if key is not None:
                self.answered[key] += 1
                if self._log is not None:
                    self._log.write(hashlib.sha1(key.encode()).hexdigest() + "\n")

    def completion(self, request: dict, text: Optional[str] = None) -> dict:
        messages = request.get("messages") or []
        text = self.answer(messages) if text is None else text
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(text.split())
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "test"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def _handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read counters, not access logs
            pass

        def _send(self, status: int, body: bytes, headers: Optional[dict] = None) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, headers: Optional[dict] = None) -> None:
            self._send(status, json.dumps({"error": {"message": message, "type": "test_server"}}).encode(), headers)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": "test", "object": "model"}]}).encode())
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                request = json.loads(raw or b"{}")
                key = prompt_key(request["messages"])
            except (ValueError, KeyError, TypeError):
                self._error(400, "body must be JSON with a messages list")
                return
            if server.api_key is not None and self.headers.get("authorization") != f"Bearer {server.api_key}":
                with server._lock:
                    server.unauthorized += 1
                self._error(401, "missing or wrong API key")
                return
            arrived = time.monotonic()
            fault = server._admit(key)
            status = {None: 200, "garbage": 200, "malformed": 200, "busy": 429, "rate_limited": 429}.get(fault, 500)
            with server._lock:
                server.arrivals.append((arrived, key, status))
            if fault == "busy":
                self._error(429, "too many requests in flight", {"retry-after": "0.2"})
                return
            try:
                if server.latency_s:
                    time.sleep(server.latency_s)
                if fault in ("error", "down"):
                    self._error(500, "injected fault")
                elif fault == "rate_limited":
                    self._error(429, "injected rate limit", {"retry-after": f"{server.retry_after_s:g}"})
                elif fault == "hang":
                    time.sleep(server.hang_s)
                    self._error(500, "injected hang")
                elif fault == "malformed":
                    self._send(200, b"{not json")
                else:
                    text = server.garbage_text if fault == "garbage" else None
                    body = json.dumps(server.completion(request, text)).encode()
                    server._release(key)
                    fault = "done"  # released with its count
                    self._send(200, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer
            finally:
                if fault != "done":
                    server._release()

    return Handler


FAULT_FLAGS = ("fail_rate", "malformed_rate", "rate_limit_rate", "retry_after_s", "hang_rate", "hang_s",
               "garbage_rate")


def start_process(port: int, log: str, latency_s: float = 0.05, max_concurrency: Optional[int] = None, **faults):
    """This server in a process of its own (it outlives a client that is killed); a Popen. `faults`:
    any of FAULT_FLAGS."""
    import subprocess
    import sys

    argv = [sys.executable, __file__, "--port", str(port), "--latency-s", str(latency_s), "--log", str(log)]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    for name, value in faults.items():
        assert name in FAULT_FLAGS, name
        argv += [f"--{name.replace('_', '-')}", str(value)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert "serving on" in server.stdout.readline()
    return server


def main() -> None:
    """`python tests/openai_server.py --port P [--latency-s S] [--log FILE]`: serve until killed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--log", default=None)
    for name in FAULT_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    args = parser.parse_args()
    faults = {name: getattr(args, name) for name in FAULT_FLAGS if getattr(args, name) is not None}
    server = OpenAIServer(latency_s=args.latency_s, max_concurrency=args.max_concurrency, port=args.port,
                          log_path=args.log, **faults)
    print(f"serving on {server.base_url}", flush=True)
    server._httpd.serve_forever()


if __name__ == "__main__":
    main()
