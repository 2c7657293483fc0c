"""What the benchmark scripts share: running `warmserve build --json` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_command(
    model: str,
    backend: str,
    cache_dir: str | Path,
    *,
    device: str | None = None,
    shared: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "deployments.cli",
        "build",
        model,
        "--backend",
        backend,
        "--cache-dir",
        str(cache_dir),
        "--json",
        *extra,
    ]
    if device:
        cmd += ["--device", device]
    if shared:
        cmd += ["--shared-cache", shared]
    return cmd


def build_env(inductor_dir: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A fresh Inductor cache per process, so that only warmserve's cache can help a warm start."""
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
        "PYTHONPATH": str(ROOT),
        "WARMSERVE_CACHE_KEY": os.environ.get("WARMSERVE_CACHE_KEY", "bench-signing-key"),  # as in production
        **(extra or {}),
    }


def run_build(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """The build's JSON report plus ``ok`` and ``process_s``; a crash or timeout is reported, not raised."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        return {"ok": False, "error": why, "stderr": p.stderr[-1500:], "process_s": wall}
    return {"ok": True, **json.loads(p.stdout), "process_s": wall}


def must(report: dict[str, Any]) -> dict[str, Any]:
    if not report["ok"]:
        raise RuntimeError(f"build failed: {report['error']}\n{report.get('stderr', '')}")
    return report
