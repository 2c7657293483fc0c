"""`warmserve cache ...` as a user runs it: a real subprocess, table and JSON output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cache.helpers import key, make_cache
from warmserve.cache.layout import entry_path
from warmserve.cache.manifest import Provenance


def warmserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warmserve.deployments.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_ls_stats_verify_evict_gc(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)
    for n in range(3):
        cache.get_or_build(key(n), lambda n=n: b"e" * (1000 + n), Provenance("aoti"))
    d = ["--cache-dir", str(tmp_path)]

    ls = warmserve("cache", "ls", *d)
    assert ls.returncode == 0, ls.stderr
    assert "TIER" in ls.stdout and ls.stdout.count("aoti") == 3

    rows = json.loads(warmserve("cache", "ls", *d, "--json").stdout)
    assert {r["key"] for r in rows} == {key(n).id for n in range(3)}
    assert all(r["backend"] == "aoti" and r["problem"] is None for r in rows)

    stats = json.loads(warmserve("cache", "stats", *d, "--json").stdout)
    assert stats["local"]["entries"] == 3 and stats["local"]["bytes"] > 3000

    ok = warmserve("cache", "verify", *d)
    assert ok.returncode == 0 and "3 of 3 entries ok" in ok.stdout

    # Flip one byte of one blob: verify names it and exits 1.
    store = cache.local.store
    blob = next(n for n in store.listdir(entry_path(key(1).id)) if n.startswith("blob-"))
    data = bytearray(store.read(entry_path(key(1).id, blob)))
    data[0] ^= 0xFF
    store.write(entry_path(key(1).id, blob), bytes(data))
    bad = warmserve("cache", "verify", *d, "--json")
    assert bad.returncode == 1
    assert len(bad.stdout.splitlines()) == 1  # machine output: one JSON document per line
    assert [r["key"] for r in json.loads(bad.stdout) if not r["ok"]] == [key(1).id]
    # What verify found shows in ls: the bad entry is quarantined (no replica can load it), the rest ok.
    rows = {r["key"]: r for r in json.loads(warmserve("cache", "ls", *d, "--json").stdout)}
    assert rows[key(1).id]["problem"].startswith("quarantined") and "digest" in rows[key(1).id]["problem"]
    assert rows[key(0).id]["problem"] is None
    table = warmserve("cache", "ls", *d).stdout
    assert next(line for line in table.splitlines() if line.split()[1] == key(1).id[:16]).split()[-1] == "digest"
    assert warmserve("cache", "verify", *d).returncode == 0

    ev = warmserve("cache", "evict", *d, "--key", key(2).id)
    assert ev.returncode == 0 and "removed 1" in ev.stdout

    gc = json.loads(warmserve("cache", "gc", *d, "--json", "--older-than", "0").stdout)
    assert gc[0]["tier"] == "local"
    assert warmserve("cache", "evict", *d, "--all").returncode == 0
    assert json.loads(warmserve("cache", "stats", *d, "--json").stdout)["local"]["entries"] == 0


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    d = ["--cache-dir", str(tmp_path)]
    r = warmserve("cache", "evict", *d, "--key", "../../etc/passwd")
    assert r.returncode == 2 and "not a cache key id" in r.stderr
    r = warmserve("cache", "ls", *d, "--tier", "shared")
    assert r.returncode != 0 and "--shared-cache" in r.stderr
    r = warmserve("cache", "evict", *d, "--all", "--tier", "peer")  # the peer tier is read, not maintained
    assert r.returncode == 2 and "the peer tier is the directories of the cluster's nodes" in r.stderr
    r = warmserve("cache", "ls", *d, "--shared-cache", "nosuchproto://x/y")
    assert r.returncode == 2 and "nosuchproto" in r.stderr
    r = warmserve("cache", "ls", env={"WARMSERVE_CACHE_BUDGET": "lots", "PATH": "/usr/bin"})
    assert r.returncode == 2 and "WARMSERVE_CACHE_BUDGET" in r.stderr
    for verb in ("verify", "ls", "stats"):  # a mistyped directory is not an empty cache
        r = warmserve("cache", verb, "--cache-dir", str(tmp_path / "does-not-exist"))
        assert r.returncode == 2 and "there is no cache directory at" in r.stderr, (verb, r.stdout)
    assert not (tmp_path / "does-not-exist").exists()
    r = warmserve("cache", "ls", "--json", "--cache-dir", str(tmp_path / "does-not-exist"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert json.loads(r.stdout) == {"error": json.loads(r.stdout)["error"], "exit_code": 2}  # one JSON line
    assert "there is no cache directory at" in json.loads(r.stdout)["error"] and len(r.stdout.splitlines()) == 1


def test_help_answers() -> None:
    r = warmserve("--help")
    assert r.returncode == 0 and "cache" in r.stdout
    r = warmserve("cache", "evict", "--help")
    assert r.returncode == 0 and "--to-budget" in r.stdout


def test_cache_commands_do_not_import_torch(tmp_path: Path) -> None:
    """`warmserve cache ...` is an operator's quick look: it must not pay for importing torch."""
    code = (
        "import sys; from warmserve.deployments.cli import main;"
        f" rc = main(['-v', 'cache', 'stats', '--cache-dir', {str(tmp_path)!r}]);"
        " assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_verify_moves_damaged_entries_only(tmp_path: Path) -> None:
    """An operator whose signing key differs from the replicas' sees every entry as BAD, but verify must not
    empty the store for every node: signature problems are reported, not quarantined."""
    cache, _ = make_cache(tmp_path, signing_key=b"the replicas' key")
    cache.get_or_build(key(1), lambda: b"engine bytes", Provenance("aoti"))
    other = {**os.environ, "WARMSERVE_SIGNING_KEY": "another key"}
    bad = warmserve("cache", "verify", "--cache-dir", str(tmp_path), env=other)
    assert bad.returncode == 1 and "signature" in bad.stdout and "quarantine" not in bad.stdout
    assert (
        warmserve(
            "cache",
            "verify",
            "--cache-dir",
            str(tmp_path),
            env={**os.environ, "WARMSERVE_SIGNING_KEY": "the replicas' key"},
        ).returncode
        == 0
    )
