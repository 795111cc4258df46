"""What the LLM runners share: error classification, retry-after, the task message, mounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from phalanx import (
    FatalError,
    InputRef,
    InstanceContext,
    PermanentError,
    RateLimited,
    RunnerError,
)
from phalanx.runners._llm import (
    api_key,
    classify_status,
    file_tools,
    opening,
    retry_after_seconds,
)


@pytest.mark.parametrize(
    ("status", "code", "kind", "retryable"),
    [
        (429, None, RateLimited, True),
        (529, None, RateLimited, True),
        (503, None, RateLimited, True),
        (500, None, RunnerError, True),
        (502, None, RunnerError, True),
        (400, None, PermanentError, False),
        (401, None, FatalError, False),
        (403, None, FatalError, False),
        (404, None, PermanentError, False),
        (429, "insufficient_quota", FatalError, False),
    ],
)
def test_classify_status(
    status: int, code: str | None, kind: type[RunnerError], retryable: bool
) -> None:
    """Rate limits and overloads wait and retry, server errors retry, client errors do not,
    and a rejected key or an empty quota is fatal to the run."""
    error = classify_status(status, "boom", retry_after=2.0, code=code)
    assert type(error) is kind
    assert error.retryable is retryable
    assert str(error).startswith(f"{status}: boom")
    if kind is RateLimited:
        assert error.retry_after == 2.0


def test_retry_after_headers() -> None:
    """Seconds, milliseconds, or nothing usable."""
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds(None) is None


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes from its variable; a local server needs none; otherwise the error names
    the variable."""
    monkeypatch.setenv("MY_KEY", "sk-test")
    assert api_key("MY_KEY", base_url=None, runner="openai") == "sk-test"
    monkeypatch.delenv("MY_KEY")
    assert api_key("MY_KEY", base_url="http://127.0.0.1:1/v1", runner="openai") == "not-needed"
    with pytest.raises(Exception, match="set MY_KEY"):
        api_key("MY_KEY", base_url=None, runner="openai")


def test_task_message_and_mounts(tmp_path: Path) -> None:
    """The first message names the instance, its parameters, the expected files in backticks
    and the read-only mounts: inputs, reads and (reference mode) the blueprint."""
    upstream = tmp_path / "data/raw/org_1"
    upstream.mkdir(parents=True)
    (tmp_path / "agents").mkdir()
    blueprint = tmp_path / "agents/02.analysis.md"
    blueprint.write_text("Analyse {ORGANIZATION_ID}.")
    ctx = InstanceContext(
        run_id="r",
        stage="analysis",
        key="org_1",
        attempt=2,
        params={"ORGANIZATION_ID": "org_1", "lower": "hidden"},
        prompt="Analyse org_1.",
        output_dir=tmp_path / "staging",
        final_dir=tmp_path / "data/analysis/org_1",
        inputs=(InputRef("research", "org_1", upstream),),
        missing=("research/org_2",),
        project_dir=tmp_path,
        log_dir=tmp_path / "logs",
        blueprint=blueprint,
        timeout=60.0,
        expected=("analysis.json", "notes/summary.md"),
        reads=("references/orgs.json",),
    )
    tools = file_tools(ctx)
    assert tools.mounts == {
        "inputs/research/org_1": upstream,
        "references/orgs.json": tmp_path / "references/orgs.json",
        "agents/02.analysis.md": blueprint,
    }
    text = opening(ctx, reference=False)[2]
    assert "instance `org_1` of stage `analysis` (attempt 2)" in text
    assert "- ORGANIZATION_ID: org_1" in text
    assert "lower" not in text
    assert "Expected files: `analysis.json`, `notes/summary.md`." in text
    assert "- `inputs/research/org_1`" in text
    assert "research/org_2" in text


def test_missing_sdk_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the provider's SDK the runner cannot be built, and the error says what to
    install."""
    import importlib

    from phalanx import UnknownPluginError
    from phalanx._config import OpenAIRunnerConfig
    from phalanx.runners._openai import OpenAIRunner

    real = importlib.import_module

    def no_openai(name: str, package: str | None = None) -> object:
        if name == "openai":
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_openai)
    with pytest.raises(UnknownPluginError, match=r"pip install 'phalanx\[openai\]'"):
        OpenAIRunner(
            OpenAIRunnerConfig(model="m", base_url="http://127.0.0.1:9/v1"),
            model="m",
            reference=False,
            prices={},
        )
