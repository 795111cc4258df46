"""The loopback LLM server: an aiohttp application on 127.0.0.1 that answers the Anthropic
Messages API and the OpenAI Chat Completions API from scripted models."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from . import _anthropic, _openai
from ._faults import Fault, FaultKind, FaultPlan
from ._limits import Limits, TokenBucket, retry_after
from ._models import Api, BlueprintModel, Model, Reply, estimate_tokens
from ._wire import Answer, InvalidRequest, Parsed, PromptCache, Usage, new_id

__all__ = ["Counters", "LoopbackLLM", "RecordedRequest"]

_SENSITIVE = ("authorization", "key", "token", "secret", "cookie", "auth")
_SHUTDOWN_GRACE = 1.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, as recorded for assertions.

    ``api`` is ``"anthropic"`` or ``"openai"`` for the APIs' endpoints (``None`` for ``/``);
    ``status`` is what was answered (``None`` when the connection was reset instead); ``fault``
    names the injected fault, if any (a 429 with no fault came from the limits). ``body`` is the
    parsed JSON body. Headers that may hold credentials (``x-api-key``, ``authorization``,
    cookies, anything named like a key or token) are never stored: ``had_api_key`` only says
    whether a key was sent.
    """

    method: str
    path: str
    api: Api | None
    model: str | None
    stream: bool
    status: int | None
    fault: FaultKind | None
    started: float
    duration: float
    body: Mapping[str, Any] | None
    headers: Mapping[str, str]
    had_api_key: bool
    request_id: str


@dataclass(frozen=True)
class Counters:
    """What the server did so far.

    ``requests`` counts model calls (``/v1/messages``, ``/v1/chat/completions``) whatever their
    outcome; ``rate_limited`` the 429s the limits (concurrency, requests or tokens per minute)
    answered; ``faults`` the injected faults, ``fault_hits`` the same per rule, in the order the
    rules were given. Token counts add up the answered requests (``input_tokens`` includes the
    cached part). ``peak_concurrency`` is the most requests that were in flight at once.
    """

    requests: int
    rate_limited: int
    faults: int
    fault_hits: tuple[int, ...]
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    peak_concurrency: int


@dataclass
class _Draft:
    """A record while its request is being answered."""

    method: str
    path: str
    api: Api | None
    request_id: str
    started: float
    headers: dict[str, str]
    had_api_key: bool
    model: str | None = None
    stream: bool = False
    status: int | None = None
    fault: FaultKind | None = None
    body: Mapping[str, Any] | None = None
    clock: float = field(default_factory=time.monotonic)

    def done(self) -> RecordedRequest:
        return RecordedRequest(
            method=self.method,
            path=self.path,
            api=self.api,
            model=self.model,
            stream=self.stream,
            status=self.status,
            fault=self.fault,
            started=self.started,
            duration=time.monotonic() - self.clock,
            body=self.body,
            headers=self.headers,
            had_api_key=self.had_api_key,
            request_id=self.request_id,
        )


class LoopbackLLM:
    """An offline LLM server on 127.0.0.1 speaking the Anthropic Messages API
    (``POST /v1/messages``, ``/v1/messages/count_tokens``) and the OpenAI Chat Completions API
    (``POST /v1/chat/completions``, ``GET /v1/models``), streamed (SSE) or not, so that the real
    SDKs and the Claude Code CLI can be tested against it.

    Start it with ``async with LoopbackLLM(...) as server:`` or, from synchronous code, ``with
    LoopbackLLM(...).running_in_thread() as server:``; point a client at :attr:`url`
    (Anthropic: ``base_url=server.url``; OpenAI: ``base_url=server.url + "/v1"``). Any API key
    is accepted.

    Knobs (keyword arguments):

    - ``models``: model name -> :class:`Model`; a request whose ``model`` is not listed is
      answered by ``default_model`` (a :class:`BlueprintModel` unless given).
    - ``latency``: seconds to wait before answering (for a stream, half before the first event
      and half spread between the events). With ``latency_sigma`` > 0 each request draws its
      latency from a log-normal distribution whose median is ``latency``.
    - ``max_concurrency``: requests in flight beyond this many are answered 429 at once, with
      ``retry-after: 1``.
    - ``requests_per_minute`` / ``tokens_per_minute``: token buckets holding one minute's
      allowance, refilled continuously; a request that does not fit (one request, its input
      tokens; output tokens are charged after answering) gets 429 with ``retry-after`` (whole
      seconds) and the API's rate-limit headers, which every response carries.
    - ``faults``: :class:`Fault` rules (errors, resets, cut streams, malformed tool calls).
    - ``seed``: seeds the latency draws and the fault rules' probabilities.
    - ``port``: 0 picks a free one.
    """

    def __init__(
        self,
        *,
        models: Mapping[str, Model] | None = None,
        default_model: Model | None = None,
        latency: float = 0.0,
        latency_sigma: float = 0.0,
        max_concurrency: int | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        faults: Sequence[Fault] = (),
        seed: int = 0,
        port: int = 0,
    ) -> None:
        if latency < 0 or latency_sigma < 0:
            raise ValueError("latency and latency_sigma must be >= 0")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        self.models: dict[str, Model] = dict(models or {})
        self.default_model: Model = default_model if default_model is not None else BlueprintModel()
        self.latency = latency
        self.latency_sigma = latency_sigma
        self.max_concurrency = max_concurrency
        self.faults = tuple(faults)
        self.seed = seed
        self._port = port
        self._limits = Limits(
            TokenBucket(requests_per_minute) if requests_per_minute is not None else None,
            TokenBucket(tokens_per_minute) if tokens_per_minute is not None else None,
        )
        self._plan = FaultPlan(self.faults, seed)
        self._random = random.Random(seed)  # noqa: S311 - simulated latency, not secrets
        self._cache = PromptCache()
        self._records: list[RecordedRequest] = []
        self._in_flight = 0
        self._peak = 0
        self._counts = {"requests": 0, "rate_limited": 0, "faults": 0}
        self._tokens = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0}
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._bound: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (only while it runs)."""
        if self._bound is None:
            raise RuntimeError("the loopback server is not running: start it first")
        return self._bound

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (only while it runs)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Bind 127.0.0.1 and start answering. Raises ``RuntimeError`` if already running."""
        if self._runner is not None:
            raise RuntimeError("the loopback server is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("HEAD", "/", self._root)
        app.router.add_get("/", self._root, allow_head=False)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and close every connection; requests still being answered are
        cancelled (recorded with ``status=None`` if nothing was answered yet). Does nothing if
        not running."""
        runner, self._runner = self._runner, None
        self._bound = None
        if runner is not None:
            for task in list(self._handlers):
                task.cancel()
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[Self]:
        """Run the server on its own event loop in a background thread, for synchronous tests
        and for driving other processes: ``with LoopbackLLM().running_in_thread() as server:``.
        On exit the server stops, the loop closes and the thread is joined. Models are called
        in that thread."""
        ready = threading.Event()
        failure: list[BaseException] = []
        control: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

        async def serve() -> None:
            stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            control.append((asyncio.get_running_loop(), stop))
            ready.set()
            try:
                await stop.wait()
            finally:
                await self.stop()

        thread = threading.Thread(
            target=lambda: asyncio.run(serve()), name="phalanx-loopback-llm", daemon=True
        )
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        try:
            yield self
        finally:
            loop, stop = control[0]
            loop.call_soon_threadsafe(stop.set)
            thread.join()

    # -- what tests read ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in the order they finished (a copy)."""
        return list(self._records)

    @property
    def counters(self) -> Counters:
        """A snapshot of the counters."""
        return Counters(
            requests=self._counts["requests"],
            rate_limited=self._counts["rate_limited"],
            faults=self._counts["faults"],
            fault_hits=tuple(self._plan.fired),
            input_tokens=self._tokens["input"],
            output_tokens=self._tokens["output"],
            cache_read_tokens=self._tokens["cache_read"],
            cache_write_tokens=self._tokens["cache_write"],
            peak_concurrency=self._peak,
        )

    # -- handlers -------------------------------------------------------------------------------

    def _draft(self, request: web.Request, api: Api | None) -> _Draft:
        headers = {
            name.lower(): value
            for name, value in request.headers.items()
            if not any(word in name.lower() for word in _SENSITIVE)
        }
        had_key = bool(request.headers.get("x-api-key") or request.headers.get("authorization"))
        return _Draft(
            method=request.method,
            path=request.path,
            api=api,
            request_id=new_id("req_"),
            started=time.time(),
            headers=headers,
            had_api_key=had_key,
        )

    async def _root(self, request: web.Request) -> web.StreamResponse:
        draft = self._draft(request, None)
        draft.status = 200
        self._records.append(draft.done())
        if request.method == "HEAD":
            return web.Response(status=200)
        return web.json_response(
            {"server": "phalanx loopback LLM", "apis": ["anthropic", "openai"]}
        )

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        api: Api = "openai" if "/chat/" in request.path else "anthropic"
        draft = self._draft(request, api)
        message = f"no such endpoint: {request.method} {request.path}"
        response = self._error(api, draft, 404, message)
        self._records.append(draft.done())
        return response

    async def _models(self, request: web.Request) -> web.StreamResponse:
        draft = self._draft(request, None)
        created = int(time.time())
        names = sorted({*self.models, "loopback"})
        entries = [
            {
                "id": name,
                "object": "model",
                "type": "model",
                "created": created,
                "created_at": "2025-01-01T00:00:00Z",
                "owned_by": "phalanx-loopback",
                "display_name": name,
            }
            for name in names
        ]
        draft.status = 200
        self._records.append(draft.done())
        return web.json_response(
            {
                "object": "list",
                "data": entries,
                "has_more": False,
                "first_id": names[0],
                "last_id": names[-1],
            }
        )

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        draft = self._draft(request, "anthropic")
        try:
            body = await _json_body(request)
            draft.body = body
            draft.model = body.get("model") if isinstance(body.get("model"), str) else None
            parsed = _anthropic.parse(body, count_only=True)
        except InvalidRequest as exc:
            response = self._error("anthropic", draft, 400, str(exc))
        else:
            draft.status = 200
            response = web.json_response(
                {"input_tokens": parsed.input_tokens}, headers={"request-id": draft.request_id}
            )
        self._records.append(draft.done())
        return response

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, "anthropic")

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, "openai")

    async def _model_call(self, request: web.Request, api: Api) -> web.StreamResponse:
        draft = self._draft(request, api)
        self._counts["requests"] += 1
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await self._answer(request, api, draft)
        finally:
            if task is not None:
                self._handlers.discard(task)
            self._in_flight -= 1
            self._records.append(draft.done())

    async def _answer(self, request: web.Request, api: Api, draft: _Draft) -> web.StreamResponse:
        admitted = await self._admit(request, api, draft)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        parsed = admitted
        model = parsed.conversation.model
        latency = self._draw_latency()
        fault = self._plan.pick(api, model, stream=parsed.stream, has_tool_calls=None)
        if fault is not None:
            self._counts["faults"] += 1
            draft.fault = fault.kind
            await _sleep(latency)
            if fault.kind == "reset":
                _reset(request)
                return web.Response(status=500)
            return self._error(api, draft, fault.status, _fault_message(fault), code=fault.code)
        try:
            reply = await self._reply(model, parsed)
        except Exception as exc:  # a user's model failing is an answer too: a 500 naming it
            await _sleep(latency)
            message = f"the loopback model raised {type(exc).__name__}: {exc}"
            return self._error(api, draft, 500, message)
        answer = self._prepare(api, reply, parsed)
        late = self._plan.pick(
            api, model, stream=parsed.stream, has_tool_calls=bool(answer.tool_calls)
        )
        if late is not None:
            self._counts["faults"] += 1
            draft.fault = late.kind
            if late.kind == "malformed_tool_call":
                answer = replace(answer, malformed=True)
        self._account(answer.usage)
        if not parsed.stream:
            await _sleep(latency)
            draft.status = 200
            if api == "anthropic":
                data = _anthropic.message(answer, message_id=new_id("msg_"), model=model)
            else:
                data = _openai.completion(
                    answer, completion_id=new_id("chatcmpl-"), model=model, created=int(time.time())
                )
            return web.json_response(data, headers=self._headers(api, draft))
        cut_after = late.after_events if late is not None and late.kind == "cut_stream" else None
        events = _events(api, answer, parsed)
        return await self._stream(request, api, draft, events, latency, cut_after)

    async def _admit(
        self, request: web.Request, api: Api, draft: _Draft
    ) -> Parsed | web.StreamResponse:
        """The parsed request, or the response refusing it (400, or 429 from the limits)."""
        try:
            body = await _json_body(request)
        except InvalidRequest as exc:
            return self._error(api, draft, 400, str(exc))
        draft.body = body
        draft.model = body.get("model") if isinstance(body.get("model"), str) else None
        draft.stream = bool(body.get("stream", False))
        if self.max_concurrency is not None and self._in_flight > self.max_concurrency:
            self._counts["rate_limited"] += 1
            message = f"too many concurrent requests (the limit is {self.max_concurrency})"
            return self._error(api, draft, 429, message, wait=1.0, kind="requests")
        try:
            parsed = _anthropic.parse(body) if api == "anthropic" else _openai.parse(body)
        except InvalidRequest as exc:
            return self._error(api, draft, 400, str(exc))
        wait, which = self._limits.admit(parsed.input_tokens, time.monotonic())
        if wait > 0.0:
            self._counts["rate_limited"] += 1
            message = f"rate limit exceeded: {which} per minute"
            return self._error(api, draft, 429, message, wait=wait, kind=which)
        return parsed

    def _account(self, usage: Usage) -> None:
        self._tokens["input"] += usage.input_tokens
        self._tokens["output"] += usage.output_tokens
        self._tokens["cache_read"] += usage.cache_read
        self._tokens["cache_write"] += usage.cache_write
        self._limits.charge_output(usage.output_tokens, time.monotonic())

    async def _reply(self, name: str, parsed: Parsed) -> Reply:
        model = self.models.get(name, self.default_model)
        result = model(parsed.conversation)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            return Reply(text=result)
        if not isinstance(result, Reply):
            raise TypeError(f"a model must return a Reply or a str, not {type(result).__name__}")
        return result

    def _prepare(self, api: Api, reply: Reply, parsed: Parsed) -> Answer:
        prefix = "toolu_" if api == "anthropic" else "call_"
        calls = tuple(
            call if call.id else replace(call, id=new_id(prefix)) for call in reply.tool_calls
        )
        text = reply.text
        spoken = text + "".join(json.dumps(dict(call.arguments)) for call in calls)
        output = estimate_tokens(spoken)
        limit = parsed.conversation.max_tokens
        stop: Any = "tool" if calls else "end"
        if limit is not None and output > limit:
            text, calls, stop, output = text[: limit * 4], (), "length", limit
        read, write = self._cache.lookup(parsed, explicit=api == "anthropic")
        usage = Usage(parsed.input_tokens, output, cache_read=read, cache_write=write)
        return Answer(text=text, tool_calls=calls, stop=stop, usage=usage)

    async def _stream(
        self,
        request: web.Request,
        api: Api,
        draft: _Draft,
        events: list[bytes],
        latency: float,
        cut_after: int | None,
    ) -> web.StreamResponse:
        await _sleep(latency / 2)
        headers = self._headers(api, draft)
        headers.update(
            {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        )
        response = web.StreamResponse(status=200, headers=headers)
        gap = latency / 2 / len(events)
        try:
            await response.prepare(request)
            draft.status = 200
            for index, data in enumerate(events):
                if cut_after is not None and index >= cut_after:
                    _cut(request)
                    return response
                await _sleep(gap)
                await response.write(data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing left to answer
        return response

    # -- responses ------------------------------------------------------------------------------

    def _headers(self, api: Api, draft: _Draft) -> dict[str, str]:
        now = time.monotonic()
        if api == "anthropic":
            return {"request-id": draft.request_id, **self._limits.anthropic_headers(now)}
        return {"x-request-id": draft.request_id, **self._limits.openai_headers(now)}

    def _error(
        self,
        api: Api,
        draft: _Draft,
        status: int,
        message: str,
        *,
        code: str | None = None,
        wait: float | None = None,
        kind: str | None = None,
    ) -> web.Response:
        draft.status = status
        headers = self._headers(api, draft)
        if wait is not None:
            headers["retry-after"] = retry_after(wait)
        if status == 401:
            headers["x-should-retry"] = "false"
        if api == "anthropic":
            body = _anthropic.error_body(status, message, code=code)
            body["request_id"] = draft.request_id
        else:
            body = _openai.error_body(status, message, code=code, kind=kind if wait else None)
        return web.json_response(body, status=status, headers=headers)

    def _draw_latency(self) -> float:
        if self.latency <= 0.0:
            return 0.0
        if self.latency_sigma <= 0.0:
            return self.latency
        return self._random.lognormvariate(math.log(self.latency), self.latency_sigma)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


async def _sleep(seconds: float) -> None:
    if seconds > 0.0:
        await asyncio.sleep(seconds)


_FAULT_MESSAGES = {
    401: "invalid x-api-key",
    429: "rate limited",
    500: "Internal server error",
    503: "Service unavailable",
    529: "Overloaded",
}


def _fault_message(fault: Fault) -> str:
    if fault.code == "insufficient_quota":
        text = "You exceeded your current quota, please check your plan and billing details"
    else:
        text = _FAULT_MESSAGES.get(fault.status, f"error {fault.status}")
    return f"{text} (injected by the phalanx loopback server)"


def _events(api: Api, answer: Answer, parsed: Parsed) -> list[bytes]:
    """The encoded server-sent events of a streamed answer."""
    model = parsed.conversation.model
    if api == "anthropic":
        pairs = _anthropic.events(answer, message_id=new_id("msg_"), model=model)
        return [_anthropic.event(name, data) for name, data in pairs]
    chunks = _openai.chunks(
        answer,
        completion_id=new_id("chatcmpl-"),
        model=model,
        created=int(time.time()),
        include_usage=parsed.include_usage,
    )
    return [*map(_openai.chunk_event, chunks), _openai.DONE]


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST, so the client sees a reset, not a clean close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _cut(request: web.Request) -> None:
    """Close the connection mid-body: what was written is delivered, the end never comes."""
    transport = request.transport
    if transport is not None:
        transport.close()
