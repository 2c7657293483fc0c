"""`warmserve cache ls | stats | verify | evict | gc`: inspect and maintain the engine cache."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from warmserve.cache import maintenance
from warmserve.cache.config import CACHE_SETTINGS, CacheConfig, add_options, given, resolve
from warmserve.cache.engine_cache import EngineCache
from warmserve.cache.keys import check_key_id
from warmserve.cache.layout import LEASES, QUARANTINE
from warmserve.cache.tier import Tier

# What `verify` moves to quarantine: damaged bytes. Not an entry still being written (no manifest yet), and
# not a signature this operator's key does not match: with another key than the replicas', that would empty
# a shared store for every node.
DAMAGED = {"digest", "size", "missing-blob", "foreign", "manifest", "format"}


def add_cache_options(p: argparse.ArgumentParser) -> None:
    add_options(p, CACHE_SETTINGS, "cache")


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    return CacheConfig.from_values(resolve(CACHE_SETTINGS, options=given(args, CACHE_SETTINGS)))


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain the engine cache", description=__doc__)
    verbs = cache.add_subparsers(dest="verb", required=True, metavar="{ls,stats,verify,evict,gc}")

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=text, description=text)
        add_cache_options(p)
        p.add_argument(
            "--tier",
            choices=("local", "shared", "peer", "all"),
            default="all",
            help="which tier (default: all, meaning local and shared; peer: what the Ray cluster of this machine "
            "holds on its nodes, for ls and stats)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
        return p

    verb("ls", "list entries: key, backend, size, age, last use, producer")
    verb("stats", "totals per tier: entries, bytes, budget, quarantined entries, open leases")
    verb("verify", "check every entry (size, sha256, signature, key); exit 1 if any is bad, quarantine damaged ones")
    p = verb("evict", "remove entries by key, all of them, or down to the budget")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--key", action="append", metavar="K", help="a key id (full 64 hex chars); repeatable")
    group.add_argument("--all", action="store_true", help="remove every entry")
    group.add_argument("--to-budget", action="store_true", help="evict least recently used entries to fit the budget")
    p = verb("gc", "delete leftovers: temp files, orphan blobs, quarantine, stale leases; then fit the budget")
    p.add_argument("--older-than", type=float, default=3600.0, metavar="S", help="minimum age in seconds (3600)")


def _tiers(cache: EngineCache, which: str) -> list[Tier]:
    if which == "shared" and cache.shared is None:
        raise SystemExit("error: --tier shared needs --shared-cache URL (or WARMSERVE_SHARED_CACHE)")
    return [t for t in cache.tiers if which in ("all", t.name)]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _ago(t: float) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s / div:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[c.upper() for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def run(args: argparse.Namespace, peers: Callable[[CacheConfig], Tier] | None = None) -> int:
    """One verb; its errors end the command at the one boundary of `warmserve` (warmserve.deployments.cli).
    ``peers`` opens the peer tier of a cluster, for ``--tier peer``."""
    config = config_from_args(args)
    if args.tier == "peer":
        if args.verb not in ("ls", "stats") or peers is None:
            raise ValueError(
                f"warmserve cache {args.verb} works on this node's directory and the shared store; the peer tier "
                "is the directories of the cluster's nodes: run it there"
            )
        out, status, text = VERBS[args.verb]([peers(config)], args)
        return _print(args, out, status, text)
    if not config.cache_dir.is_dir():
        raise FileNotFoundError(
            f"there is no cache directory at {config.cache_dir} (nothing was cached there); "
            "--cache-dir or $WARMSERVE_CACHE_DIR names the directory replicas use"
        )
    return _run(args, EngineCache.from_config(config))


Records = list[dict[str, Any]]
Outcome = tuple[Records, int, str]  # the JSON records, the exit status, the text for a person


def _ls(tiers: list[Tier], args: argparse.Namespace) -> Outcome:
    out: Records = []
    for tier in tiers:
        for q in maintenance.quarantined(tier.store):
            out.append(
                {
                    "tier": tier.name,
                    "key": q.key_id,
                    "backend": "?",
                    "bytes": q.size,
                    "created": None,
                    "last_used": 0.0,
                    "producer": "?",
                    "signed": False,
                    "problem": f"quarantined {_ago(q.since)}: {q.reason}",
                    "quarantined_at": q.since,
                }
            )
        for e in maintenance.entries(tier.store):
            m = e.manifest
            out.append(
                {
                    "tier": tier.name,
                    "key": e.key_id,
                    "backend": m.backend if m else "?",
                    "bytes": e.size,
                    "created": m.created if m else None,
                    "last_used": e.last_used,
                    "producer": m.producer if m else "?",
                    "signed": bool(m and m.signature),
                    "problem": e.problem,
                }
            )
    rows = [
        {
            **r,
            "key": r["key"][:16],
            "size": _size(r["bytes"]),
            "created": _ago(r["created"] or 0),
            "last_used": _ago(r["last_used"]),
            "status": r["problem"] or "ok",
        }
        for r in out
    ]
    columns = ["tier", "key", "backend", "size", "created", "last_used", "producer", "status"]
    return out, 0, table(rows, columns) if rows else "no entries"


def _stats(tiers: list[Tier], args: argparse.Namespace) -> Outcome:
    out: Records = []
    for tier in tiers:
        entries = maintenance.entries(tier.store)
        out.append(
            {
                "tier": tier.name,
                "url": tier.store.url,
                "entries": len(entries),
                "bytes": sum(e.size for e in entries),
                "budget": tier.budget_bytes,
                "quarantined": len(tier.store.listdir(QUARANTINE)),
                "leases": len(tier.store.listdir(LEASES)),
            }
        )
    rows = [{**r, "bytes": _size(r["bytes"]), "budget": _size(r["budget"]) if r["budget"] else "none"} for r in out]
    return out, 0, table(rows, ["tier", "entries", "bytes", "budget", "quarantined", "leases", "url"])


def _verify(tiers: list[Tier], args: argparse.Namespace) -> Outcome:
    out: Records = []
    for tier in tiers:
        for entry in maintenance.entries(tier.store):
            problem = maintenance.verify(tier.store, entry.key_id, tier.signing_key)
            reason = (problem or "").partition(":")[0]
            if reason in DAMAGED:  # as a lookup would: moved aside, so no replica can load it
                tier.quarantine(entry.key_id, reason)
            out.append({"tier": tier.name, "key": entry.key_id, "ok": problem is None, "problem": problem})
    bad = [r for r in out if not r["ok"]]
    lines = []
    for r in bad:
        moved = " (moved to quarantine)" if r["problem"].partition(":")[0] in DAMAGED else ""
        lines.append(f"BAD  {r['tier']:6}  {r['key']}  {r['problem']}{moved}")
    lines.append(f"{len(out) - len(bad)} of {len(out)} entries ok" + (f", {len(bad)} bad" if bad else ""))
    return out, 1 if bad else 0, "\n".join(lines)


def _evict(tiers: list[Tier], args: argparse.Namespace) -> Outcome:
    out: Records = []
    for tier in tiers:
        if args.to_budget:
            n, freed = tier.evict()
            out.append({"tier": tier.name, "removed": n, "bytes": freed})
            continue
        keys = maintenance.key_ids(tier.store) if args.all else [check_key_id(k) for k in args.key]
        removed = [k for k in keys if maintenance.remove(tier.store, k)]
        out.append({"tier": tier.name, "removed": len(removed), "keys": removed})
    return out, 0, "\n".join(f"{r['tier']}: removed {r['removed']} entries" for r in out)


def _gc(tiers: list[Tier], args: argparse.Namespace) -> Outcome:
    out: Records = []
    for tier in tiers:
        counts = maintenance.gc(tier.store, older_than=args.older_than)
        n, freed = tier.evict()
        out.append({"tier": tier.name, **counts, "evicted": n, "evicted_bytes": freed})
    return out, 0, "\n".join(f"{r['tier']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "tier") for r in out)


VERBS: dict[str, Callable[[list[Tier], argparse.Namespace], Outcome]] = {
    "ls": _ls,
    "stats": _stats,
    "verify": _verify,
    "evict": _evict,
    "gc": _gc,
}


def _run(args: argparse.Namespace, cache: EngineCache) -> int:
    """One verb over the chosen tiers: its records as one JSON document (``--json``; stats keyed by tier), or its
    text; exit 1 when ``verify`` finds a bad entry."""
    return _print(args, *VERBS[args.verb](_tiers(cache, args.tier), args))


def _print(args: argparse.Namespace, out: Records, status: int, text: str) -> int:
    if args.json:
        print(json.dumps(out if args.verb != "stats" else {r["tier"]: r for r in out}))
    elif text:
        print(text)
    return status
