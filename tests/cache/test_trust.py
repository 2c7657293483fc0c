"""A store that others can write to needs a signing key: entries hold code that every replica loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmserve.cache import CacheConfig, UntrustedCache

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, **kw: object) -> CacheConfig:
    return CacheConfig.load(environ={}, cache_dir=tmp_path / "l1", **kw)


def test_private_local_cache_needs_no_key(tmp_path: Path) -> None:
    config(tmp_path).require_trust()


def test_remote_shared_store_needs_a_key_or_an_explicit_trust(tmp_path: Path) -> None:
    with pytest.raises(UntrustedCache, match="WARMSERVE_SIGNING_KEY") as e:
        config(tmp_path, shared_url="s3://bucket/warmserve").require_trust()
    assert "s3://bucket/warmserve" in str(e.value)
    config(tmp_path, shared_url="s3://bucket/warmserve", signing_key=b"k").require_trust()
    trusted = CacheConfig.load(
        environ={"WARMSERVE_TRUST_SHARED_CACHE": "1"}, cache_dir=tmp_path / "l1", shared_url="s3://b/w"
    )
    trusted.require_trust()


def test_the_old_name_of_the_signing_key_still_works_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match="WARMSERVE_CACHE_KEY is deprecated .* set WARMSERVE_SIGNING_KEY"):
        old = CacheConfig.load(environ={"WARMSERVE_CACHE_KEY": "k1"}, cache_dir=tmp_path)
    assert old.signing_key == b"k1"
    both = {"WARMSERVE_CACHE_KEY": "k1", "WARMSERVE_SIGNING_KEY": "k2"}
    with pytest.warns(FutureWarning, match="both are set; WARMSERVE_SIGNING_KEY is used"):
        assert CacheConfig.load(environ=both, cache_dir=tmp_path).signing_key == b"k2"
    assert CacheConfig.load(environ={"WARMSERVE_SIGNING_KEY": "k2"}, cache_dir=tmp_path).signing_key == b"k2"


@pytest.mark.parametrize(
    ("where", "mode", "refused"),
    [("l1", 0o777, True), ("l1", 0o775, False), ("shared", 0o770, True), ("shared", 0o755, False)],
)
def test_directories_writable_by_others_need_a_key(tmp_path: Path, where: str, mode: int, refused: bool) -> None:
    directory = tmp_path / where
    directory.mkdir()
    os.chmod(directory, mode)
    cfg = config(tmp_path, shared_url=str(tmp_path / "shared") if where == "shared" else None)
    if refused:
        with pytest.raises(UntrustedCache, match=str(directory)):
            cfg.require_trust()
        config(tmp_path, shared_url=cfg.shared_url, signing_key=b"k").require_trust()
    else:
        cfg.require_trust()


def test_build_refuses_an_unsigned_shared_store_with_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSERVE_")}
    cmd = [
        sys.executable,
        "-m",
        "warmserve.deployments.cli",
        "build",
        "tests.serve.models:tiny_cnn",
        "--input-shape",
        "3,16,16",
        "--backend",
        "eager",
        "--cache-dir",
        str(tmp_path / "l1"),
        "--shared-cache",
        "s3://bucket/warmserve",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "WARMSERVE_SIGNING_KEY" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
