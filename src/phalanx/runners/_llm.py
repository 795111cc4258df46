"""What the LLM runners share: the messages an instance starts from, its file tools, how a
provider's errors map onto phalanx's, and the transcript of an attempt."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .._config import LLMRunnerConfig
from .._errors import (
    FatalError,
    PermanentError,
    RateLimited,
    RunnerError,
    UnknownPluginError,
    UsageError,
)
from .._prices import Price
from .._templates import stringify
from ._base import InstanceContext, Runner
from .tools import FileTools

__all__ = [
    "REFERENCE_SYSTEM",
    "APIRunner",
    "Clients",
    "Transcript",
    "api_key",
    "classify_status",
    "estimate_tokens",
    "file_tools",
    "limit_headers",
    "opening",
    "provider_message",
    "retry_after_seconds",
    "task_message",
]

REFERENCE_SYSTEM = (
    "You are one instance of an agent that phalanx runs in parallel, one per data partition. "
    "Your task message tells you which blueprint to read and the parameters to apply. Use the "
    "file tools: read_file to read the blueprint and your inputs, write_file to write every "
    "output file into your output folder."
)


def api_key(env: str, *, base_url: str | None, runner: str) -> str:
    """The API key from environment variable ``env``. A local server (``base_url`` set) often
    needs none; then any placeholder will do."""
    key = os.environ.get(env, "")
    if key:
        return key
    if base_url:
        return "not-needed"
    raise UsageError(
        f"the {runner} runner needs an API key: set {env} (or set `api_key_env:` to the name "
        "of the variable that holds it, or `base_url:` for a local server)"
    )


def file_tools(ctx: InstanceContext) -> FileTools:
    """The attempt's tools: its staging folder, its inputs under ``inputs/STAGE/KEY``, the
    stage's declared reads, and (in reference mode) its blueprint, all read-only."""
    mounts: dict[str, Path] = {f"inputs/{ref.stage}/{ref.key}": ref.path for ref in ctx.inputs}
    for rel in ctx.reads:
        mounts[rel] = ctx.project_dir / rel
    if ctx.blueprint is not None and ctx.blueprint.is_relative_to(ctx.project_dir):
        mounts[ctx.blueprint.relative_to(ctx.project_dir).as_posix()] = ctx.blueprint
    return FileTools(ctx.output_dir, mounts)


def task_message(
    ctx: InstanceContext,
    *,
    writing: str,
    reading: str,
    readable: Sequence[str],
    notes: Sequence[str] = (),
) -> str:
    """The task an instance is given: who it is, its parameters, how to write (``writing``),
    the files the stage expects — on one ``Expected files:`` line, names in backticks — what it
    may read (``reading`` above the ``readable`` items), ``notes``, the inputs that are missing,
    and why its previous attempt was rejected."""
    lines = [f"You are instance `{ctx.key}` of stage `{ctx.stage}` (attempt {ctx.attempt})."]
    params = [
        f"- {name}: {stringify(value)}"
        for name, value in ctx.params.items()
        if name.isupper() and name.isidentifier()
    ]
    if params:
        lines += ["", "Parameters:", *params]
    lines += ["", writing]
    if ctx.expected:
        lines.append("Expected files: " + ", ".join(f"`{name}`" for name in ctx.expected) + ".")
    if readable:
        lines += ["", reading, *readable]
    lines += list(notes)
    if ctx.missing:
        lines.append("These inputs did not complete and are absent: " + ", ".join(ctx.missing))
    if ctx.feedback:
        lines += [
            "",
            f"Your previous attempt was rejected: {ctx.feedback}. Fix this in this attempt.",
        ]
    lines += ["", "When every file is written, reply with one short sentence and stop."]
    return "\n".join(lines)


def opening(ctx: InstanceContext, *, reference: bool) -> tuple[FileTools, str, str]:
    """The file tools, system prompt and first user message of an API runner's conversation:
    the blueprint as system prompt (inline mode), or the reference wording leading the user
    message (reference mode)."""
    tools = file_tools(ctx)
    user = task_message(
        ctx,
        writing="Write every output file with the write_file tool; paths are relative to your "
        "output folder.",
        reading="You may read (read_file, list_files), read-only:",
        readable=[f"- `{name}`" for name in sorted(tools.mounts)],
    )
    if reference:
        return tools, REFERENCE_SYSTEM, ctx.prompt + "\n\n" + user
    return tools, ctx.prompt, user


def classify_status(
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> RunnerError:
    """A provider's HTTP error as a phalanx error: 429/529/503 wait and retry (carrying the
    rate-limit ``headers``, for the lane), other 5xx retry, 4xx (bad request, unknown model)
    cannot be fixed by retrying, and a rejected key or an empty quota stops the whole run."""
    text = f"{status}: {message}"
    if code == "insufficient_quota":
        return FatalError(f"{text} (billing: the account has no quota left)")
    if status in (401, 403):
        return FatalError(f"{text} (check the API key and its permissions)")
    if status in (429, 503, 529):
        return RateLimited(text, retry_after=retry_after, headers=headers)
    if status >= 500 or status == 408:
        return RunnerError(text, retry_after=retry_after)
    return PermanentError(text)


def provider_message(body: object, fallback: str) -> str:
    """The words of a provider's error body (Anthropic ``{"error": {"message"}}``, OpenAI's
    error object), without the SDK's ``Error code: 500 -`` prefix."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return fallback


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """``retry-after`` (seconds, or ``retry-after-ms``) from a response's headers."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None


def limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a lane reads (``retry-after``, ``retry-after-ms`` and the rate-limit
    family), lower-cased; nothing else of a response (cookies, ids) is carried further."""
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower().startswith(("retry-after", "anthropic-ratelimit-", "x-ratelimit-"))
    }


def estimate_tokens(request: Mapping[str, Any], max_tokens: int) -> int:
    """What a call may cost, reserved in its lane before it is sent: its input at about four
    characters a token (of the JSON request; cheap, and generous for JSON's punctuation) plus
    all the output it may produce."""
    return len(json.dumps(request, ensure_ascii=False, default=str)) // 4 + max_tokens


class APIRunner(Runner):
    """What the Anthropic and OpenAI runners share: the optional SDK, loaded when the runner
    is built (a missing one is reported with the command that installs it), and one client
    with the SDK's own retries off, shared through ``clients`` when the run gives one.

    ``lane`` is ``(provider, base_url, model, key digest)``: the first twelve hex digits of the
    key's SHA-256, enough to tell two keys apart without the key itself ever being held in a
    name that is logged or displayed."""

    provider: ClassVar[str]
    client_class: ClassVar[str]

    def __init__(
        self,
        config: LLMRunnerConfig,
        *,
        model: str,
        reference: bool,
        prices: Mapping[str, Price],
        clients: Clients | None = None,
    ) -> None:
        try:
            self.sdk: Any = importlib.import_module(self.provider)
        except ImportError:
            raise UnknownPluginError(
                f"the {self.provider} runner needs its SDK: pip install 'phalanx[{self.provider}]'"
            ) from None
        self.model = model
        self.reference = reference
        self.prices = prices
        key = api_key(config.api_key_env, base_url=config.base_url, runner=self.provider)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.lane = (self.provider, config.base_url, model, digest)

        def make() -> Any:
            client_class = getattr(self.sdk, self.client_class)
            return client_class(api_key=key, base_url=config.base_url, max_retries=0)

        self.owned = clients is None
        self.client: Any = (
            make() if clients is None else clients.get(self.provider, config.base_url, key, make)
        )

    async def aclose(self) -> None:
        if self.owned:
            await self.client.close()


class Clients:
    """SDK clients shared by every stage of a run that talks to the same provider, endpoint and
    key: one connection pool each, however many stages use it. The run closes them at its end."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str | None, str], Any] = {}

    def get(self, provider: str, base_url: str | None, key: str, make: Callable[[], Any]) -> Any:
        """The client for ``(provider, base_url, key)``, made by ``make`` the first time."""
        name = (provider, base_url, key)
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    async def aclose(self) -> None:
        for client in self._made.values():
            await client.close()
        self._made.clear()


class Transcript:
    """The attempt's conversation, one JSON object a line, in ``transcript.jsonl`` beside its
    other logs. Only what the model saw and said: no headers, no keys."""

    def __init__(self, ctx: InstanceContext) -> None:
        self.path = ctx.log_dir / "transcript.jsonl"
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("w", encoding="utf-8")

    def write(self, kind: str, **data: Any) -> None:
        self._handle.write(json.dumps({"kind": kind, **data}, ensure_ascii=False, default=str))
        self._handle.write("\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
