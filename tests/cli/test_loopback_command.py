"""``phalanx loopback`` serves the fake LLM until Ctrl-C, for rehearsing pipelines offline."""

from __future__ import annotations

import signal
import subprocess
import sys

import openai


def test_loopback_command_serves_until_interrupted() -> None:
    """It prints its URL, answers a real SDK's request, and stops cleanly on SIGINT."""
    process = subprocess.Popen(
        [sys.executable, "-m", "phalanx", "loopback", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("loopback LLM listening on http://127.0.0.1:"), first
        url = first.rsplit(" ", 1)[1].strip()
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="anything", messages=[{"role": "user", "content": "hello"}]
        )
        client.close()
        assert reply.choices[0].message.content
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "served 1 requests" in stderr
