"""``phalanx run --otel`` exports the run's spans over OTLP/HTTP to the collector the
standard variables name: here a stand-in collector on 127.0.0.1 started by the test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, ClassVar

import pytest

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, int]]] = []  # each server gets its own list

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        self.received.append((self.path, self.headers.get("Content-Type", ""), length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    received: list[tuple[str, str, int]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_run_otel_exports_spans_to_the_configured_collector(
    make_project: ProjectFactory,
    collector: tuple[str, list[tuple[str, str, int]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    project = make_project(make_project.one_stage(make_project.runner("write"), ["a", "b"]))
    done = project.cli("run", "pipeline.yaml", "--quiet", "--otel")
    assert done.returncode == 0, done.stderr
    assert received, "no spans reached the collector"
    assert {path for path, _, _ in received} == {"/v1/traces"}
    assert all(kind == "application/x-protobuf" and size > 0 for _, kind, size in received)
