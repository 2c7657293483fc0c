"""L1 on a real full filesystem: a 1 MiB tmpfs mounted in a private mount namespace (``unshare``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = (
    "import json, sys; from tests.cache.workers import full_filesystem;"
    " print(json.dumps(full_filesystem(*sys.argv[1:])))"
)


def run_on_tmpfs(l1: Path, l2: Path) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    l1.mkdir()
    # Root in a new user namespace can mount a tmpfs that only this child sees.
    mount = 'mount -t tmpfs -o size=1m warmserve-l1 "$1" && exec "$0" -c "$2" "$1" "$3"'
    cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c", mount, sys.executable, str(l1), CHILD, str(l2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "tests.cache" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_full_l1_evicts_to_make_room_and_never_loses_an_entry(tmp_path: Path) -> None:
    out = run_on_tmpfs(tmp_path / "l1", tmp_path / "l2")
    # Two 350 KiB entries fill most of the 1 MiB filesystem; the third evicts the least recently used.
    assert out["after_c"] == ["a", "c"]
    assert out["b_in_l2"], "an entry evicted from L1 is still in the shared tier"
    # An entry bigger than the whole filesystem: served from the build, stored in L2, counted, and it
    # evicted nothing from L1 (that could not have made room).
    assert out["d"] == ["built", 2 * 2**20]
    assert out["after_d"] == ["a", "c"]
    assert out["d_in_l2"]
    assert out["local_hit_a"], "L1 stays in use for reads while it is full"
    assert out["temp_files"] == [], "no partial file is left behind"
    assert out["events"].get("store_error local write-full") == 1, out["events"]
    assert out["events"].get("evicted local") == 1, out["events"]
