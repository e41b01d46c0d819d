"""A real HTTP server on 127.0.0.1 (ephemeral port) speaking the chat-completions API, driven by tests.

The real `openai` client talks to it over a socket, so the tests exercise the client's HTTP, timeout and error
handling, not a mock. Each request is recorded (body, headers, captions it carried, arrival time); `script` decides
the reply per request (default: a good answer with attribute-preserving paraphrases), so a test can inject 429s,
500s, hangs, malformed JSON, short answers or wrong paraphrases for chosen captions.

Run standalone for manual checks:  python tests/fake_openai_server.py  (prints its base URL, Ctrl-C to stop)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# Framings different enough that no two paraphrases of a caption are near duplicates, and free of any word the
# attribute extractor reads (numbers, colours, locations, instruments, procedures, negation cues).
FRAMINGS = (
    "Create a picture {tail}.",
    "Please produce an endoscopy frame {tail}, rendered realistically.",
    "{Tail}: that is what the synthetic photograph should show.",
    "I would like a realistic endoscopic view {tail}.",
    "Render a medical image {tail}, as seen during the examination.",
)


def faithful_paraphrase(caption: str, k: int) -> str:
    """The k-th attribute-preserving rewording of a dev caption (deterministic)."""
    tail = caption.rstrip(".")
    for head in ("Generate an image ", "Generate "):
        if tail.startswith(head):
            tail = tail[len(head):]
            break
    tail = tail.replace("an an ", "an ").replace("lower-rigth", "lower-right")
    framing = FRAMINGS[k % len(FRAMINGS)]
    text = framing.format(tail=tail, Tail=tail[:1].upper() + tail[1:])
    if k >= len(FRAMINGS):  # more than 5 asked: append a different closing sentence per round (no digits)
        closing = ("Make it look real.", "Keep it sharp and clear.", "Use natural lighting.")
        text += " " + closing[(k // len(FRAMINGS) - 1) % len(closing)]
    return text


@dataclass
class SeenRequest:
    index: int  # 0-based arrival order
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    captions: list[str]  # the captions listed in the user message, in id order
    per_caption: int | None
    t: float


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before answering (a hang when longer than the client's timeout)
    hold: threading.Event | None = None  # block until set (or the server stops)
    content_type: str = "application/json"


def completion(content: str | None, finish_reason: str = "stop", model: str = "fake-model",
               prompt_tokens: int = 100, completion_tokens: int = 50) -> dict:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def answer(items: list[tuple[int, list[Any]]], **kw) -> Reply:
    return Reply(body=completion(json.dumps({"items": [{"id": i, "paraphrases": p} for i, p in items]}), **kw))


def good_reply(req: SeenRequest, n: int | None = None,
               fn: Callable[[str, int], Any] = faithful_paraphrase) -> Reply:
    """A correct answer: n (default: as asked) paraphrases for every caption of the request."""
    n = req.per_caption if n is None else n
    return answer([(i, [fn(c, k) for k in range(n)]) for i, c in enumerate(req.captions, 1)])


def error_reply(status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None,
                param: str | None = None) -> Reply:
    return Reply(status=status, headers=headers or {},
                 body={"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})


_HTML = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"

# 200 answers that are not a chat completion carrying the expected JSON: what proxies, captive portals, overloaded
# gateways and confused local servers send. name -> (body, content type).
MALFORMED: dict[str, tuple[Any, str]] = {
    "html": (_HTML, "text/html; charset=utf-8"),
    "html_labelled_json": (_HTML, "application/json"),
    "plain_text": ("upstream connect error or disconnect/reset before headers", "text/plain"),
    "empty_body": ("", "application/json"),
    "json_list": ([{"choices": []}], "application/json"),
    "no_choices": ({"id": "x", "object": "chat.completion", "model": "fake-model"}, "application/json"),
    "empty_choices": ({"id": "x", "object": "chat.completion", "choices": []}, "application/json"),
    "choices_not_list": ({"choices": {"0": {"message": {"content": "{}"}}}}, "application/json"),
    "no_message": ({"choices": [{"index": 0, "finish_reason": "stop"}]}, "application/json"),
    "null_content": (completion(None), "application/json"),
    "empty_content": (completion("  "), "application/json"),
    "content_not_text": (dict(completion(""), choices=[{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": 42}}]),
                         "application/json"),
    "content_prose": (completion("Sure! Here are some paraphrases: a polyp, two polyps."), "application/json"),
    "items_not_list": (completion('{"items": "none"}'), "application/json"),
    "ids_out_of_range": (completion('{"items": [{"id": 99, "paraphrases": ["Show a polyp."]}]}'),
                         "application/json"),
    "paraphrases_not_text": (completion('{"items": [{"id": 1, "paraphrases": [1, 2, null]}]}'), "application/json"),
    "cut_off": (completion('{"items": [{"id": 1, "paraphrases": ["Show', finish_reason="length"),
                "application/json"),
}


def malformed_reply(kind: str) -> Reply:
    body, content_type = MALFORMED[kind]
    return Reply(body=body, content_type=content_type)


_CAPTIONS_RX = re.compile(r'\[\s*\{\s*"id"\s*:\s*\d+\s*,\s*"caption"')  # not the template's answer example
_N_RX = re.compile(r"Write (\d+) paraphrases")


def _parse_captions(messages: list[dict]) -> tuple[list[str], int | None]:
    user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "") or ""
    if not isinstance(user, str):
        return [], None
    m = _CAPTIONS_RX.search(user)
    caps: list[str] = []
    if m:
        listing, _ = json.JSONDecoder().raw_decode(user, m.start())
        caps = [it["caption"] for it in sorted(listing, key=lambda it: it["id"])]
    n = _N_RX.search(user)
    return caps, int(n.group(1)) if n else None


class _QuietServer(ThreadingHTTPServer):
    """socketserver prints a traceback to sys.stderr when a connection fails mid-request (a client that hung up on
    a keep-alive socket, say). In-process CLI tests capture sys.stderr, so that print would land in the CLI's
    "one-line error" under test: keep the failures in `errors` instead."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.errors: list[str] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        import traceback
        self.errors.append(traceback.format_exc())


class FakeOpenAIServer:
    """`with FakeOpenAIServer() as srv:` -> srv.base_url ("http://127.0.0.1:PORT/v1"), srv.requests, srv.script."""

    def __init__(self, script: Callable[[SeenRequest], Reply | None] | None = None):
        self.script = script
        self.requests: list[SeenRequest] = []
        self.caption_counts: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0  # most requests the server held at once (checks the client's concurrency limit)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {}
                try:
                    caps, n = _parse_captions(body.get("messages", []))
                except (ValueError, KeyError, TypeError):  # a request the fake cannot read: say so, loudly
                    caps, n = ["<unparseable request>"], None
                with server._lock:
                    req = SeenRequest(len(server.requests), self.path, {k.lower(): v for k, v in self.headers.items()},
                                      body, caps, n, time.monotonic())
                    server.requests.append(req)
                    server.caption_counts.update(caps)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(req)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, req: SeenRequest) -> None:
                if not self.path.endswith("/chat/completions"):
                    reply = error_reply(404, f"no route {self.path}")
                else:
                    reply = (server.script(req) if server.script else None) or good_reply(req)
                if reply.hold is not None:
                    while not reply.hold.wait(0.05) and not server._stopping.is_set():
                        pass
                if reply.delay:
                    server._stopping.wait(reply.delay)
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = payload.encode("utf-8")
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", reply.content_type)
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def captions_sent(self) -> list[str]:
        return [c for r in self.requests for c in r.captions]

    def wait_for_requests(self, n: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"server saw {len(self.requests)} requests, expected {n}")
            time.sleep(0.01)

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    with FakeOpenAIServer() as srv:
        print(srv.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
