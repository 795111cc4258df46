"""The OpenAI Chat Completions dialect: requests in, completions and chunks out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._models import Conversation, ToolCall, ToolResult, Turn
from ._wire import Answer, InvalidRequest, Parsed, dumps, pieces

__all__ = ["DONE", "chunk_event", "chunks", "completion", "error_body", "parse"]

DONE = b"data: [DONE]\n\n"

_FINISH = {"end": "stop", "tool": "tool_calls", "length": "length"}

_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(
    status: int, message: str, *, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """The body OpenAI sends with an error status. ``code`` (e.g. ``insufficient_quota``)
    becomes both the type and the code; ``kind`` overrides the type alone (``tokens`` for a
    tokens-per-minute 429)."""
    default_type, default_code = _ERRORS.get(status, ("server_error", None))
    error_type = kind or code or default_type
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": None,
            "code": code or default_code,
        }
    }


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        )
    return ""


def _tool_name(tool: object) -> str | None:
    if not isinstance(tool, dict):
        return None
    for key in ("function", "custom"):
        inner = tool.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("name"), str):
            return str(inner["name"])
    return None


def _call(raw: object) -> ToolCall:
    entry = raw if isinstance(raw, dict) else {}
    function = entry.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments", "")
    parsed: object = None
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            parsed = None
    return ToolCall(
        name=str(function.get("name", "")),
        arguments=parsed if isinstance(parsed, dict) else {},
        id=str(entry.get("id", "")),
        raw=None if isinstance(parsed, dict) else str(arguments),
    )


def parse(body: Mapping[str, Any]) -> Parsed:
    """A Chat Completions request. Unknown fields are ignored; ``system`` and ``developer``
    messages join the system prompt; consecutive ``tool`` messages make one user turn."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array")

    segments: list[str] = ["tool:" + dumps(tool) for tool in tools]
    breakpoints: list[int] = []
    names = [name for name in map(_tool_name, tools) if name is not None]
    system_parts: list[str] = []
    turns: list[Turn] = []
    for index, entry in enumerate(messages):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"messages[{index}]: expected an object")
        segments.append(dumps(entry))
        breakpoints.append(len(segments) - 1)
        role = entry.get("role")
        content = entry.get("content")
        if role in ("system", "developer"):
            system_parts.append(_text_of(content))
        elif role == "user":
            turns.append(Turn("user", _text_of(content)))
        elif role == "assistant":
            calls = entry.get("tool_calls") or []
            turns.append(Turn("assistant", _text_of(content), tuple(_call(c) for c in calls)))
        elif role == "tool":
            result = ToolResult(str(entry.get("tool_call_id", "")), _text_of(content))
            last = turns[-1] if turns else None
            if last is not None and last.role == "user" and last.tool_results and not last.text:
                turns[-1] = Turn("user", "", (), (*last.tool_results, result))
            else:
                turns.append(Turn("user", "", (), (result,)))
        else:
            raise InvalidRequest(f"messages[{index}].role: unsupported role {role!r}")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidRequest("max_tokens must be an integer >= 1")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    conversation = Conversation(
        api="openai",
        model=model,
        system="\n".join(part for part in system_parts if part),
        turns=tuple(turns),
        tools=tuple(names),
        max_tokens=max_tokens,
    )
    return Parsed(
        conversation, bool(body.get("stream", False)), segments, breakpoints, include_usage
    )


def _usage(answer: Answer) -> dict[str, Any]:
    usage = answer.usage
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _arguments(answer: Answer, call: ToolCall) -> str:
    text = json.dumps(dict(call.arguments), ensure_ascii=False)
    return text[:-1] + ",,}" if answer.malformed else text


def completion(answer: Answer, *, completion_id: str, model: str, created: int) -> dict[str, Any]:
    """A non-streamed response."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": answer.text if answer.text or not answer.tool_calls else None,
        "refusal": None,
        "annotations": [],
    }
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(answer, call)},
            }
            for call in answer.tool_calls
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH[answer.stop],
            }
        ],
        "usage": _usage(answer),
        "service_tier": "default",
        "system_fingerprint": "fp_loopback",
    }


def chunks(
    answer: Answer, *, completion_id: str, model: str, created: int, include_usage: bool
) -> list[dict[str, Any]]:
    """The chunks of a streamed response (without the final ``[DONE]``)."""
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_loopback",
    }
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    if answer.text:
        out.extend(chunk({"content": piece}) for piece in pieces(answer.text))
    for index, call in enumerate(answer.tool_calls):
        opening = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        out.append(chunk({"tool_calls": [opening]}))
        out.extend(
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in pieces(_arguments(answer, call))
        )
    out.append(chunk({}, _FINISH[answer.stop]))
    if include_usage:
        out.append({**base, "choices": [], "usage": _usage(answer)})
    return out


def chunk_event(data: Mapping[str, Any]) -> bytes:
    """One chunk as OpenAI writes it: a ``data:`` line, no event name."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
