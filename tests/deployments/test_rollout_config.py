"""Rollout bookkeeping without a cluster: version labels bound to digests, the last-good record, Ray's token."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from warmserve.deployments import ledger
from warmserve.deployments.dashboard import Dashboard, ray_token
from warmserve.deployments.errors import DashboardError, VersionConflict
from warmserve.deployments.rollout import user_config_of, with_weights
from warmserve.deployments.runner import bind_weights

A, B = "a" * 64, "b" * 64


def config(user_config: dict[str, Any] | None = None, cache_dir: str = "/nowhere") -> dict[str, Any]:
    return {
        "applications": [
            {
                "name": "warmserve",
                "args": {"model": "tests.serve.models:tiny_cnn", "cache_dir": cache_dir},
                "deployments": [{"name": "WarmModel", "user_config": user_config or {}}],
            }
        ]
    }


def test_a_version_label_names_one_content() -> None:
    v2 = with_weights(config(), "warmserve", "WarmModel", "/w/v2.safetensors", "v2", A)
    uc = user_config_of(v2, "warmserve", "WarmModel")
    assert uc["weights_sha256"] == A and uc["versions"] == {"v2": A}
    with pytest.raises(VersionConflict, match="v2 already names other weights"):
        with_weights(v2, "warmserve", "WarmModel", "/w/nan.safetensors", "v2", B)
    v3 = with_weights(v2, "warmserve", "WarmModel", "/w/v3.safetensors", "v3", B)
    assert user_config_of(v3, "warmserve", "WarmModel")["versions"] == {"v2": A, "v3": B}
    # The history outlives the current version: v2 still names A after v3 went out.
    with pytest.raises(VersionConflict):
        with_weights(v3, "warmserve", "WarmModel", "/w/other.safetensors", "v2", B)
    assert user_config_of(v2, "warmserve", "WarmModel")["weights_version"] == "v2"  # inputs never edited


def test_last_good_rollout_is_resumed_unless_weights_are_given(tmp_path: Path) -> None:
    record = ledger.Rollout(
        "warmserve", "tests.serve.models:tiny_cnn", "/w/v2.safetensors", "v2", A, versions={"v2": A}
    )
    ledger.record(tmp_path, record)
    resumed = config({"weights": None, "weights_version": "v1"}, cache_dir=str(tmp_path))
    note = bind_weights(resumed, explicit=False, resume=True)
    assert note and "resuming the last rollout: weights v2" in note
    uc = user_config_of(resumed, "warmserve", "WarmModel")
    assert (uc["weights"], uc["weights_version"], uc["weights_sha256"]) == ("/w/v2.safetensors", "v2", A)

    for explicit, resume in ((True, True), (False, False)):
        kept = config({"weights": None, "weights_version": "v1"}, cache_dir=str(tmp_path))
        note = bind_weights(kept, explicit=explicit, resume=resume)
        assert note and note.startswith("not resuming")
        assert user_config_of(kept, "warmserve", "WarmModel")["weights_version"] == "v1"

    other_model = config(cache_dir=str(tmp_path))
    other_model["applications"][0]["args"]["model"] = "tests.serve.models:tiny_cnn_wide"
    assert bind_weights(other_model, explicit=False, resume=True) is None

    (tmp_path / "rollouts" / next(p.name for p in (tmp_path / "rollouts").iterdir())).write_text("{not json")
    with pytest.raises(ValueError, match="--no-resume"):
        bind_weights(config(cache_dir=str(tmp_path)), explicit=False, resume=True)


def test_ray_token_is_found_where_ray_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert ray_token({}) == "from-file"
    (tmp_path / "t").write_text("from-path")
    assert ray_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == "from-path"
    assert ray_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}) == "from-env"


class _TokenServer(BaseHTTPRequestHandler):
    """Answers like the Ray dashboard with token auth on (no token: 401, wrong token: 403)."""

    def do_GET(self) -> None:
        auth = self.headers.get("authorization")
        code = 401 if auth is None else 200 if auth == "Bearer right" else 403
        body = json.dumps({"applications": {}}).encode() if code == 200 else b"Unauthorized"
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def token_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_calls_carry_the_token(token_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in server with Ray's answers; tests/e2e does the same against a real Ray with auth on."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Dashboard(token_server, environ={"RAY_AUTH_TOKEN": "right"}).details() == {"applications": {}}
    with pytest.raises(DashboardError, match="no token was found: set RAY_AUTH_TOKEN"):
        Dashboard(token_server, environ={}).details()
    with pytest.raises(DashboardError, match="the token sent was refused"):
        Dashboard(token_server, environ={"RAY_AUTH_TOKEN": "wrong"}).details()
    with pytest.raises(DashboardError, match="cannot reach the Ray dashboard"):
        Dashboard("http://127.0.0.1:9", environ={}).details()


def test_explicit_weights_get_their_digest_pinned_and_cannot_reuse_a_label(tmp_path: Path) -> None:
    from warmserve.deployments.errors import StartError
    from warmserve.serve.model import build_model
    from warmserve.serve.weights import demo_weights, save_weights, weights_digest

    model = build_model("tests.serve.models:tiny_cnn")
    save_weights(demo_weights(model, seed=1), tmp_path / "a.safetensors")
    save_weights(demo_weights(model, seed=2), tmp_path / "b.safetensors")
    a = weights_digest(str(tmp_path / "a.safetensors"))
    ledger.record(
        tmp_path, ledger.Rollout("warmserve", "tests.serve.models:tiny_cnn", "x", "v2", a, versions={"v2": a})
    )
    fresh = config({"weights": str(tmp_path / "b.safetensors"), "weights_version": "v3"}, cache_dir=str(tmp_path))
    bind_weights(fresh, explicit=True, resume=True)
    uc = user_config_of(fresh, "warmserve", "WarmModel")
    assert uc["weights_sha256"] == weights_digest(str(tmp_path / "b.safetensors"))
    assert uc["versions"] == {"v2": a, "v3": uc["weights_sha256"]}  # the history travels with the config
    reused = config({"weights": str(tmp_path / "b.safetensors"), "weights_version": "v2"}, cache_dir=str(tmp_path))
    with pytest.raises(StartError, match="version v2 already names other weights"):
        bind_weights(reused, explicit=True, resume=True)


def test_a_restart_signs_the_weights_it_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas with an admin token take only signed weights, the ones a restart resumes included."""
    from warmserve.deployments.auth import rollout_problem

    ledger.record(
        tmp_path, ledger.Rollout("warmserve", "tests.serve.models:tiny_cnn", "/w/v2", "v2", A, versions={"v2": A})
    )
    monkeypatch.setenv("WARMSERVE_ADMIN_TOKEN", "t0ken")
    resumed = config({"weights": None, "weights_version": "v1", "signature": "stale"}, cache_dir=str(tmp_path))
    bind_weights(resumed, explicit=False, resume=True)
    uc = user_config_of(resumed, "warmserve", "WarmModel")
    assert rollout_problem(uc, "t0ken") is None
    assert "does not match" in (rollout_problem(uc, "other") or "")
