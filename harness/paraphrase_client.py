"""Chat-completions transport for `harness paraphrase`: the official `openai` client under one retry policy.

The client's own retries are switched off (`max_retries=0`): its backoff constants are private and not
configurable, and we want one policy, exposed as CLI options, for every fault:

- 429 (rate limit): wait what the server's `retry-after-ms` / `retry-after` header says (seconds or HTTP date),
  else exponential backoff; a 429 that says the quota is used up is fatal (retrying cannot help).
- 408, 409, 5xx, timeouts, connection errors: exponential backoff with jitter, up to `max_retries` retries.
- 400 about `response_format` while in "auto" mode: the server does not support structured output (gpt-3.5-turbo
  has no json_schema, some local servers no json_object) - step down json_schema -> json_object -> text once, for
  all later requests too, without spending a retry.
- any other 4xx (bad key, unknown model, bad request): fatal, raised as a UserError.
- a 200 whose body is not the expected answer (HTML from a proxy, no `choices`, empty or non-text content, wrong
  types, or content the caller's `parse` rejects): a fault like a 5xx ("malformed"), retried the same way. The body is
  read and checked here, not by the openai client, which would hand back an HTML page as a plain string.

The API key is only ever handed to the client (which puts it in the Authorization header). Every message that can
reach a log, a cache or the terminal goes through `redact`, since servers echo keys back in 401 bodies.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from harness.errors import UserError

FORMAT_CHAIN = ("json_schema", "json_object", "text")  # what "auto" steps down through
T = TypeVar("T")
MAX_RETRY_AFTER_S = 300.0  # a server asking for more than this is capped (we still wait, just not for hours)


class RequestFailed(Exception):
    """Retries exhausted for one request (the batch's captions are reported as failed; a rerun resends them)."""


class MalformedAnswer(Exception):
    """A 200 answer that is not what was asked for (raised by the body check or by `complete`'s `parse`)."""


class FatalAPIError(UserError):
    """A fault no retry can fix (authentication, unknown model, quota, malformed request): the run stops."""


@dataclass
class Completion:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TransportStats:
    requests: int = 0  # HTTP requests sent, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)  # fault kind -> retries spent on it
    format_changes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def redact(text: str, secrets: tuple[str | None, ...]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def safe_url(url: str | None) -> str | None:
    """A base URL fit for logs and provenance: user:password@ and query string removed."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, then `retry-after` as seconds or an HTTP date."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after":
                parsed = email.utils.parsedate_tz(value)
                if parsed is not None:
                    return max(0.0, email.utils.mktime_tz(parsed) - time.time())
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _count(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else 0


def completion_from_body(text: str) -> Completion:
    """The first choice of a chat-completions response body; MalformedAnswer unless it is a JSON object with a
    non-empty `choices` list whose first `message.content` is non-empty text. Token counts are bookkeeping only: a
    missing or mistyped `usage` counts as 0 rather than failing a usable answer."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        head = " ".join(text[:60].split())
        raise MalformedAnswer(f"response body is not JSON (starts {head!r})") from None
    if not isinstance(data, dict):
        raise MalformedAnswer(f"response body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedAnswer("response has no 'choices'" if choices is None else "response 'choices' is not a "
                              "non-empty list")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise MalformedAnswer("response choice has no 'message' object")
    content = message.get("content")
    if not isinstance(content, str):
        raise MalformedAnswer("response message content is " + ("missing" if content is None else
                                                                 f"a {type(content).__name__}, not text"))
    if not content.strip():
        raise MalformedAnswer("response message content is empty")
    finish = first.get("finish_reason")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(content, finish if isinstance(finish, str) else None, _count(usage.get("prompt_tokens")),
                      _count(usage.get("completion_tokens")))


def response_format_param(mode: str, schema: dict) -> dict | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "paraphrases", "schema": schema, "strict": True}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


class ChatClient:
    """`complete(messages)` with the retry policy above. One instance per run; not shared across event loops."""

    def __init__(self, *, model: str, api_key: str, base_url: str | None, timeout: float, max_retries: int,
                 backoff_base: float, backoff_max: float, response_format: str, schema: dict,
                 temperature: float | None, seed: int | None, on_notice: Callable[[str], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        from openai import AsyncOpenAI

        if response_format not in ("auto",) + FORMAT_CHAIN:
            raise UserError(f"response format must be auto, {', '.join(FORMAT_CHAIN)}; got {response_format!r}")
        self.model = model
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.auto_format = response_format == "auto"
        self.format = "json_schema" if self.auto_format else response_format
        self.schema = schema
        self.temperature = temperature
        self.seed = seed
        self.stats = TransportStats()
        self._secrets = (api_key,)
        self._notice = on_notice or (lambda msg: None)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._client = AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)

    async def aclose(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half fixed, half random, so concurrent workers do not retry in lockstep.
        cap = min(self.backoff_max, self.backoff_base * (2.0 ** attempt))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def _clean(self, msg: str) -> str:
        return redact(" ".join(str(msg).split()), self._secrets)[:300]

    async def complete(self, messages: list[dict[str, str]],
                       parse: Callable[[Completion], T] = lambda c: c) -> T:
        """`parse(completion)` of the first usable answer. `parse` raising MalformedAnswer makes the answer a
        fault, retried under the same policy as a 5xx (the request is sent again unchanged)."""
        import openai

        attempt = 0
        while True:
            kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
            fmt = response_format_param(self.format, self.schema)
            if fmt is not None:
                kwargs["response_format"] = fmt
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            if self.seed is not None:
                kwargs["seed"] = self.seed
            self.stats.requests += 1
            try:
                raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
            except openai.RateLimitError as e:
                if e.code == "insufficient_quota" or "insufficient_quota" in str(e.body):
                    raise FatalAPIError(f"API quota exhausted (429 insufficient_quota): {self._clean(e.message)}") \
                        from None
                kind, wait = "429", retry_after_seconds(e.response.headers)
                wait = min(wait, MAX_RETRY_AFTER_S) if wait is not None else None
            except openai.APITimeoutError:
                kind, wait = "timeout", None
            except openai.APIConnectionError as e:
                kind, wait = "connection", None
                if attempt >= self.max_retries:
                    raise RequestFailed(f"connection error after {attempt + 1} attempts: {self._clean(e.message)}") \
                        from None
            except openai.APIStatusError as e:
                status = e.status_code
                if status == 400 and self.auto_format and self._is_format_complaint(e) \
                        and self.format != FORMAT_CHAIN[-1]:
                    old = self.format
                    self.format = FORMAT_CHAIN[FORMAT_CHAIN.index(old) + 1]
                    self.stats.format_changes.append(f"{old}->{self.format}")
                    self._notice(f"server rejected response_format {old}; using {self.format} from now on")
                    continue  # not a fault of the request itself: no retry spent
                if status in (408, 409) or status >= 500:
                    kind, wait = str(status), retry_after_seconds(e.response.headers)
                    wait = min(wait, MAX_RETRY_AFTER_S) if wait is not None else None
                else:
                    hint = {401: " (check OPENAI_API_KEY)", 403: " (key lacks access)",
                            404: f" (unknown model {self.model!r} or wrong --base-url?)"}.get(status, "")
                    raise FatalAPIError(f"API error {status}{hint}: {self._clean(e.message)}") from None
            except openai.APIError as e:  # e.g. a response the client cannot decode at all
                kind, wait = "bad_response", None
                if attempt >= self.max_retries:
                    raise RequestFailed(f"{self._clean(e.message)}") from None
            else:
                try:
                    comp = completion_from_body(raw.text)
                    self.stats.prompt_tokens += comp.prompt_tokens
                    self.stats.completion_tokens += comp.completion_tokens
                    return parse(comp)
                except MalformedAnswer as e:
                    kind, wait, why = "malformed", None, self._clean(str(e))
                    if attempt >= self.max_retries:
                        raise RequestFailed(f"malformed answer after {attempt + 1} attempts: {why}") from None

            if attempt >= self.max_retries:
                raise RequestFailed(f"{kind} after {attempt + 1} attempts")
            self.stats.retries[kind] += 1
            await self._sleep(wait if wait is not None else self._backoff(attempt))
            attempt += 1

    @staticmethod
    def _is_format_complaint(e: Exception) -> bool:
        text = f"{getattr(e, 'message', '')} {getattr(e, 'param', '')} {getattr(e, 'body', '')}".lower()
        return "response_format" in text or "json_schema" in text or "json_object" in text
