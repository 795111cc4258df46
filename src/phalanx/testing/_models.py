"""What a scripted model sees and says, and the two models phalanx ships.

A model is a plain callable: it receives a :class:`Conversation` (the request, normalized the
same way for both APIs) and returns the next assistant turn as a :class:`Reply` (or a plain
string). It runs for every request that reaches it, so it must be stateless: everything it needs
to know about earlier turns is in the conversation.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Api",
    "BlueprintModel",
    "Conversation",
    "Model",
    "Reply",
    "ScriptedModel",
    "ToolCall",
    "ToolResult",
    "Turn",
    "estimate_tokens",
]

Api = Literal["anthropic", "openai"]


def estimate_tokens(text: str) -> int:
    """About one token per four characters, at least one."""
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True)
class ToolCall:
    """A call of tool ``name`` with ``arguments``. In a :class:`Reply`, leave ``id`` empty and
    the server assigns one in the API's style (``toolu_...``, ``call_...``). In a conversation,
    ``raw`` holds the arguments as sent when they were not a JSON object (then ``arguments`` is
    empty)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""
    raw: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """The result the client sent back for the tool call ``call_id``."""

    call_id: str
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class Turn:
    """One message of the conversation: its text (text blocks joined by newlines), the tool
    calls an assistant turn made, the tool results a user turn carries (OpenAI's ``tool``
    messages become user turns)."""

    role: Literal["user", "assistant"]
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """The normalized request a model answers.

    ``system`` joins the system prompt and any ``system`` / ``developer`` entries found among
    the messages; ``tools`` are the names of the tools offered, in order; ``model`` and
    ``max_tokens`` are the request's (``max_tokens`` is ``None`` when the request set none).
    """

    api: Api
    model: str
    system: str
    turns: tuple[Turn, ...]
    tools: tuple[str, ...] = ()
    max_tokens: int | None = None

    @property
    def first_user_text(self) -> str:
        """The text of the first user turn ('' if there is none)."""
        return next((turn.text for turn in self.turns if turn.role == "user"), "")

    @property
    def last_user_text(self) -> str:
        """The text of the last user turn ('' if there is none)."""
        return next((turn.text for turn in reversed(self.turns) if turn.role == "user"), "")

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """Every tool call the assistant made so far, in order."""
        return tuple(call for turn in self.turns for call in turn.tool_calls)

    @property
    def tool_results(self) -> tuple[ToolResult, ...]:
        """Every tool result sent back so far, in order."""
        return tuple(result for turn in self.turns for result in turn.tool_results)

    @property
    def assistant_turns(self) -> int:
        """How many assistant turns the conversation already holds."""
        return sum(turn.role == "assistant" for turn in self.turns)


@dataclass(frozen=True)
class Reply:
    """The next assistant turn: some text, some tool calls, or both. With tool calls the
    response stops with ``tool_use`` / ``tool_calls``, otherwise with ``end_turn`` / ``stop``
    (``max_tokens`` / ``length`` when it does not fit in the request's ``max_tokens``)."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class Model(Protocol):
    """What the server calls to answer a request: a plain function (or any callable) taking a
    :class:`Conversation` and returning a :class:`Reply` or a string, or an awaitable of one.
    An exception it raises becomes a 500 response naming it."""

    def __call__(self, conversation: Conversation, /) -> Reply | str | Awaitable[Reply | str]: ...


class ScriptedModel:
    """Replays fixed replies: the first answers a conversation with no assistant turn yet, the
    second one with one assistant turn, and so on; once the script runs out the last reply
    repeats. Stateless, so concurrent conversations each get the whole script."""

    def __init__(self, *replies: Reply | str) -> None:
        if not replies:
            raise ValueError("ScriptedModel needs at least one reply")
        self.replies: tuple[Reply, ...] = tuple(
            Reply(text=r) if isinstance(r, str) else r for r in replies
        )

    def __call__(self, conversation: Conversation, /) -> Reply:
        return self.replies[min(conversation.assistant_turns, len(self.replies) - 1)]


# ---------------------------------------------------------------------------------------------
# The default model

_BACKTICKED = re.compile(r"`([^`\s]{1,300})`")
_SAFE_PATH = re.compile(r"[\w.\-/]+")
_EXTENSION = re.compile(r"[^/.][^/]*\.[A-Za-z][A-Za-z0-9]{0,9}")
_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
_EXPECTED_LINE = re.compile(r"expected (?:files|outputs?)\b", re.IGNORECASE)
_PARAM_LINE = re.compile(r"^\s*[-*]\s*([A-Z][A-Z0-9_]*)\s*:\s*(.+?)\s*$", re.MULTILINE)
_WORKDIR = re.compile(
    r"^\s*(?:[-*]\s*)?(?:primary )?working directory\s*:\s*(/\S.*?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def _relative_file(candidate: str) -> str | None:
    """``candidate`` if it is a relative file path with an extension, else ``None``."""
    if candidate.startswith("/") or not _SAFE_PATH.fullmatch(candidate):
        return None
    parts = candidate.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return candidate if _EXTENSION.fullmatch(parts[-1]) else None


def backticked_files(text: str) -> list[str]:
    """The relative file names written in backticks in ``text``, in order, without repeats."""
    found: dict[str, None] = {}
    for match in _BACKTICKED.finditer(text):
        name = _relative_file(match.group(1))
        if name is not None:
            found.setdefault(name)
    return list(found)


@dataclass(frozen=True)
class BlueprintModel:
    """The default model: it fulfils a blueprint by writing every file the prompt names.

    The files are the relative paths with an extension written in backticks (`` `a.json` ``,
    `` `out/report.md` ``) in the system prompt and the first user message, in order of
    appearance, without repeats. When a line mentions "expected files" (as phalanx's task
    message does), only the names on such lines count, so the inputs a prompt lists for reading
    are not written back. Text inside ``<system-reminder>`` tags is skipped, and so is the
    system prompt of a Claude Code request (recognized by its ``Write`` tool): that prompt is
    Claude Code's own, the task comes in the user message.

    While some file has not been written yet in this conversation (a call whose arguments did
    not parse wrote nothing) and a ``write_file`` tool is offered (input ``{path, content}``),
    it replies with one ``write_file`` call per such file. When only Claude Code's ``Write``
    tool is offered, it calls that with ``{file_path, content}``, the path made absolute with
    the prompt's ``Working directory:`` (or ``Primary working directory:``) line. Once every
    file was asked for, or with no file tool, it answers with a short text.

    Content is plausible for the extension (``.json``: an object with ``source``, ``file``,
    ``params`` and ``items``; ``.md``: a heading and a few lines; ``.jsonl``, ``.csv``, ``.yaml``
    likewise; anything else: a line of text). ``contents`` overrides it per path or base name.
    """

    contents: Mapping[str, str] = field(default_factory=dict)

    def expected_files(self, conversation: Conversation) -> list[str]:
        """The files this model will write for ``conversation``."""
        text = conversation.first_user_text
        if not _claude_code(conversation):
            text = f"{conversation.system}\n{text}"
        text = _REMINDER.sub("", text)
        marked = "\n".join(line for line in text.splitlines() if _EXPECTED_LINE.search(line))
        return backticked_files(marked) or backticked_files(text)

    def __call__(self, conversation: Conversation, /) -> Reply:
        files = self.expected_files(conversation)
        workdir = _working_directory(conversation)
        written = {_written_path(call, workdir) for call in conversation.tool_calls}
        pending = [name for name in files if name not in written]
        if pending and "write_file" in conversation.tools:
            calls = tuple(
                ToolCall("write_file", {"path": name, "content": self.content(name, conversation)})
                for name in pending
            )
            return Reply(f"Writing {_listing(pending)}.", calls)
        if pending and _claude_code(conversation):
            calls = tuple(
                ToolCall(
                    "Write",
                    {
                        "file_path": posixpath.join(workdir, name) if workdir else name,
                        "content": self.content(name, conversation),
                    },
                )
                for name in pending
            )
            return Reply(f"Writing {_listing(pending)}.", calls)
        if files and not pending:
            return Reply(f"Done: wrote {_listing(files)}.")
        asked = " ".join(conversation.last_user_text.split())[:80]
        return Reply(f"Loopback reply to: {asked}" if asked else "Loopback reply.")

    def content(self, name: str, conversation: Conversation) -> str:
        """The text this model writes into file ``name``."""
        override = self.contents.get(name, self.contents.get(posixpath.basename(name)))
        if override is not None:
            return override
        params = dict(_PARAM_LINE.findall(conversation.first_user_text))
        subject = next(iter(params.values()), "the task")
        extension = posixpath.splitext(name)[1].lower()
        if extension == ".json":
            document = {
                "source": "loopback",
                "file": name,
                "model": conversation.model,
                "params": params,
                "items": [{"id": i, "title": f"Finding {i} about {subject}"} for i in (1, 2, 3)],
            }
            return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        if extension == ".jsonl":
            return "".join(
                json.dumps({"id": i, "source": "loopback", "about": subject}, ensure_ascii=False)
                + "\n"
                for i in (1, 2, 3)
            )
        if extension == ".md":
            stem = posixpath.splitext(posixpath.basename(name))[0]
            title = stem.replace("_", " ").replace("-", " ").strip().capitalize() or name
            return (
                f"# {title}\n\nWritten by the phalanx loopback model ({conversation.model}).\n\n"
                f"- Subject: {subject}\n- Source: loopback\n"
            )
        if extension == ".csv":
            return "id,source,about\n" + "".join(f"{i},loopback,{subject}\n" for i in (1, 2))
        if extension in (".yaml", ".yml"):
            return f"source: loopback\nfile: {json.dumps(name)}\nabout: {json.dumps(subject)}\n"
        return f"{name}: written by the phalanx loopback model about {subject}.\n"


def _claude_code(conversation: Conversation) -> bool:
    """Whether the request looks like Claude Code's: its ``Write`` tool, no ``write_file``."""
    return "Write" in conversation.tools and "write_file" not in conversation.tools


def _listing(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _working_directory(conversation: Conversation) -> str | None:
    text = f"{conversation.system}\n{conversation.first_user_text}"
    match = _WORKDIR.search(text)
    return match.group(1).rstrip("/") if match else None


def _written_path(call: ToolCall, workdir: str | None) -> str:
    """The relative path a prior write call wrote ('' for other calls)."""
    if call.name == "write_file":
        return str(call.arguments.get("path", ""))
    if call.name == "Write":
        path = str(call.arguments.get("file_path", ""))
        if workdir and path.startswith(workdir + "/"):
            return path[len(workdir) + 1 :]
        return path
    return ""
