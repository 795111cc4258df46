"""The Anthropic Messages dialect: requests in, messages and server-sent events out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._models import Conversation, ToolCall, ToolResult, Turn
from ._wire import Answer, InvalidRequest, Parsed, dumps, pieces

__all__ = ["error_body", "event", "events", "message", "parse"]

_STOP = {"end": "end_turn", "tool": "tool_use", "length": "max_tokens"}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str, *, code: str | None = None) -> dict[str, Any]:
    """The body Anthropic sends with an error status."""
    kind = code or _ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _text_of(content: object) -> str:
    """The text of a string or of a list of content blocks (non-text blocks skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


class _Prompt:
    """The prompt's segments (stable strings) and cache breakpoints, collected in order."""

    def __init__(self) -> None:
        self.segments: list[str] = []
        self.breakpoints: list[int] = []

    def add(self, label: str, block: object) -> None:
        marked = isinstance(block, dict) and block.get("cache_control") is not None
        if isinstance(block, dict) and "cache_control" in block:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        self.segments.append(f"{label}:" + (block if isinstance(block, str) else dumps(block)))
        if marked:
            self.breakpoints.append(len(self.segments) - 1)


def _turn(index: int, role: str, content: object, prompt: _Prompt) -> Turn:
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ToolResult] = []
    for block in blocks:
        if not isinstance(block, dict):
            raise InvalidRequest(f"messages.{index}.content: blocks must be objects")
        prompt.add(role, block)
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = block.get("input")
            calls.append(
                ToolCall(
                    name=str(block.get("name", "")),
                    arguments=arguments if isinstance(arguments, dict) else {},
                    id=str(block.get("id", "")),
                    raw=None if isinstance(arguments, dict) else json.dumps(arguments),
                )
            )
        elif kind == "tool_result":
            results.append(
                ToolResult(
                    call_id=str(block.get("tool_use_id", "")),
                    content=_text_of(block.get("content", "")),
                    is_error=bool(block.get("is_error", False)),
                )
            )
    return Turn(
        "assistant" if role == "assistant" else "user",
        "\n".join(texts),
        tuple(calls),
        tuple(results),
    )


def parse(body: Mapping[str, Any], *, count_only: bool = False) -> Parsed:
    """A Messages request (or a ``count_tokens`` one, which has no ``max_tokens``).

    Unknown fields and block types are ignored; ``role: "system"`` entries among the messages
    join the system prompt, as Claude Code sends some."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required (a model name)")
    max_tokens = body.get("max_tokens")
    if not count_only and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise InvalidRequest("max_tokens: Field required (an integer >= 1)")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required (a list)")
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")

    prompt = _Prompt()
    names: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest("tools: each tool needs a name")
        names.append(tool["name"])
        prompt.add("tool", tool)
    system_parts: list[str] = []
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidRequest("system: Input should be a string or a list of blocks")
    for block in [system] if isinstance(system, str) else system or []:
        system_parts.append(_text_of(block if isinstance(block, str) else [block]))
        prompt.add("system", block)

    turns: list[Turn] = []
    for index, entry in enumerate(messages):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"messages.{index}: Input should be an object")
        role = entry.get("role")
        content = entry.get("content", "")
        if role == "system":
            system_parts.append(_text_of(content))
            prompt.add("system", content)
        elif role in ("user", "assistant"):
            turns.append(_turn(index, role, content, prompt))
        else:
            raise InvalidRequest(f"messages.{index}.role: Input should be 'user' or 'assistant'")

    conversation = Conversation(
        api="anthropic",
        model=model,
        system="\n".join(part for part in system_parts if part),
        turns=tuple(turns),
        tools=tuple(names),
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
    )
    return Parsed(
        conversation, bool(body.get("stream", False)), prompt.segments, prompt.breakpoints
    )


def _usage(answer: Answer, *, output_tokens: int) -> dict[str, Any]:
    usage = answer.usage
    return {
        "input_tokens": max(0, usage.input_tokens - usage.cache_read - usage.cache_write),
        "output_tokens": output_tokens,
        "cache_read_input_tokens": usage.cache_read,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "service_tier": "standard",
    }


def _broken(arguments: Mapping[str, Any]) -> str:
    """JSON that no parser accepts, partial or not."""
    return json.dumps(arguments, ensure_ascii=False)[:-1] + ",,}"


def _blocks(answer: Answer) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if answer.text or not answer.tool_calls:
        blocks.append({"type": "text", "text": answer.text})
    for call in answer.tool_calls:
        arguments: object = _broken(call.arguments) if answer.malformed else dict(call.arguments)
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return blocks


def message(answer: Answer, *, message_id: str, model: str) -> dict[str, Any]:
    """A non-streamed response."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _blocks(answer),
        "stop_reason": _STOP[answer.stop],
        "stop_sequence": None,
        "usage": _usage(answer, output_tokens=answer.usage.output_tokens),
    }


def events(answer: Answer, *, message_id: str, model: str) -> list[tuple[str, dict[str, Any]]]:
    """The server-sent events of a streamed response, as (event name, data) pairs."""
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(answer, output_tokens=1),
    }
    out: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(_blocks(answer)):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces(block["text"])]
        else:
            opening = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            raw = block["input"]
            if not isinstance(raw, str):
                raw = json.dumps(raw, ensure_ascii=False)
            deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces(raw)]
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        out.extend(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        )
        out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP[answer.stop], "stop_sequence": None},
                "usage": _usage(answer, output_tokens=answer.usage.output_tokens),
            },
        )
    )
    out.append(("message_stop", {"type": "message_stop"}))
    return out


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event as Anthropic writes it."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
