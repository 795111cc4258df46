"""What both API dialects share: request errors, the prompt as hashable segments (for token
counts and the simulated prompt cache), the prepared answer, ids and stream pieces."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from ._models import Conversation, ToolCall, estimate_tokens

__all__ = [
    "Answer",
    "InvalidRequest",
    "Parsed",
    "PromptCache",
    "Usage",
    "dumps",
    "new_id",
    "pieces",
]

# OpenAI caches prompts automatically from this length on.
_AUTO_CACHE_MIN_TOKENS = 1024
_AUTO_CACHE_STEP = 128
_CACHE_ENTRIES = 50_000


class InvalidRequest(Exception):
    """The request body is not something the API would accept (answered with 400)."""


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def pieces(text: str, count: int = 3) -> list[str]:
    """``text`` cut into at most ``count`` consecutive non-empty pieces (one empty piece for an
    empty text)."""
    if not text:
        return [""]
    size = max(1, -(-len(text) // count))
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass
class Parsed:
    """A request, understood: the conversation for the model, and the prompt as segments.

    ``segments`` are the prompt's parts in order (tools, system, message blocks) as stable
    strings; ``breakpoints`` are the indexes after which a prefix may be cached: Anthropic's
    ``cache_control`` marks, or every message end for OpenAI's automatic caching."""

    conversation: Conversation
    stream: bool
    segments: list[str]
    breakpoints: list[int]
    include_usage: bool = False

    @property
    def input_tokens(self) -> int:
        return estimate_tokens("".join(self.segments))


@dataclass(frozen=True)
class Usage:
    """Token counts of one response. ``input_tokens`` is the whole prompt, cached part
    included; each API reports it its own way."""

    input_tokens: int
    output_tokens: int
    cache_read: int = 0
    cache_write: int = 0


@dataclass(frozen=True)
class Answer:
    """The model's reply ready for the wire: tool calls carry ids, the stop reason is known."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    stop: Literal["end", "tool", "length"]
    usage: Usage
    malformed: bool = False


@dataclass
class PromptCache:
    """A simulated prompt cache: hashes of prompt prefixes seen before."""

    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > _CACHE_ENTRIES:
            self._seen.popitem(last=False)

    def lookup(self, parsed: Parsed, *, explicit: bool) -> tuple[int, int]:
        """(tokens read from the cache, tokens written to it) for this prompt.

        Explicit (Anthropic): the prefix up to the last ``cache_control`` mark is cached; the
        longest part of it seen before (at any block boundary) is read, the rest written.
        Automatic (OpenAI): the longest prefix seen before, at a message boundary, is read when
        the prompt is long enough, in steps of 128 tokens; nothing is reported as written."""
        if not parsed.breakpoints:
            return 0, 0
        digest = hashlib.sha256(f"{parsed.conversation.api}:{parsed.conversation.model}".encode())
        hashes: list[str] = []
        chars: list[int] = []
        total = 0
        for segment in parsed.segments:
            digest.update(b"\x00" + segment.encode())
            hashes.append(digest.copy().hexdigest())
            total += len(segment)
            chars.append(total)
        if explicit:
            last = max(parsed.breakpoints)
            read = next((i for i in range(last, -1, -1) if hashes[i] in self._seen), None)
            read_tokens = chars[read] // 4 if read is not None else 0
            write_tokens = chars[last] // 4 - read_tokens
            for i in parsed.breakpoints:
                self._remember(hashes[i])
            if read is not None:
                self._remember(hashes[read])
            return read_tokens, write_tokens
        read_tokens = 0
        if parsed.input_tokens >= _AUTO_CACHE_MIN_TOKENS:
            for i in sorted(parsed.breakpoints, reverse=True):
                if hashes[i] in self._seen:
                    read_tokens = chars[i] // 4 // _AUTO_CACHE_STEP * _AUTO_CACHE_STEP
                    break
        for i in parsed.breakpoints:
            self._remember(hashes[i])
        return read_tokens, 0
