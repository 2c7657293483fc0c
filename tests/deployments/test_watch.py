"""What `warmserve run` says while it serves: the service stops answering and answers again, and the local Ray's
GCS going away ends the watch with the reason (tests/e2e/test_run_command.py kills the real ones)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from warmserve.deployments import runner


@contextmanager
def healthz(port: int = 0, status: list[int] | None = None) -> Iterator[int]:
    """An HTTP server answering ``/-/healthz`` with ``status[0]`` (200 by default; the caller may change it), on
    ``port`` (0: a free one)."""
    status = status or [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0]
            self.send_response(code if self.path == "/-/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"Service Unavailable" if code == 503 else b"success")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_an_outage_is_said_once_its_end_with_its_length_and_a_lost_gcs_ends_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said: list[str] = []
    monkeypatch.setattr(runner, "say", said.append)

    def spoken(text: str, timeout: float = 10.0) -> str:
        waited = threading.Event()
        while not waited.wait(0.05):
            found = [line for line in said if text in line]
            if found:
                return found[-1]
            timeout -= 0.05
            assert timeout > 0, f"{text!r} never said; said: {said}"
        raise AssertionError("unreachable")

    gcs = socket.create_server(("127.0.0.1", 0))
    gcs_address = f"127.0.0.1:{gcs.getsockname()[1]}"
    result: list[str] = []
    with healthz() as port:
        url = f"http://127.0.0.1:{port}"
        watch = threading.Thread(target=lambda: result.append(runner._watch(url, gcs_address, interval=0.05)))
        watch.start()
        threading.Event().wait(0.5)
        assert said == []  # answering: nothing to say
    assert spoken("not answering") == (
        f"the service at {url} is not answering: it refuses connections (Ray Serve restarts its ingress)"
    )
    status = [200]
    with healthz(port, status):
        assert spoken("answers again").startswith(f"the service at {url} answers again, after ")
        status[0] = 503  # up, but no replica ready behind it
        assert spoken("HTTP 503") == (
            f"the service at {url} is not answering: no replica is ready behind it (HTTP 503 from /-/healthz)"
        )
        threading.Event().wait(0.3)
        assert len([line for line in said if "not answering" in line]) == 2  # once per outage, not per check
        gcs.close()  # the local Ray's GCS goes away: the watch ends, with why
        watch.join(10)
    assert result == [
        f"the local Ray cluster stopped under the service (its GCS at {gcs_address} takes no connections)"
    ]


def test_an_ipv6_gcs_address_as_ray_writes_it() -> None:
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        port = listener.getsockname()[1]
        assert runner._connects(f"[::1]:{port}")  # a healthy GCS must not read as a lost one
    assert not runner._connects(f"[::1]:{port}")
