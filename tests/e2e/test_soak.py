"""The soak (bench/soak.py), shortened for CI: a rollout every 8 s under steady load on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import markdown, soak
from tests.e2e.cluster import RayCluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# RSS growth of a replica from the sample after the first two rollouts (the load's and the first swaps' own
# allocations are done by then) to the last, over the five rollouts after them. Measured on 2 busy cores:
# 2.7-3.4 MiB with the aoti backend, 1.5-1.8 MiB with eager (no engine loads), in steps of 0.3-0.7 MiB at
# the rollouts and nearly flat between them. 6 MiB, about twice the worst measured: a leak of 1.2 MiB or more
# per rollout fails (a copy of a real model's weights, a kept engine); a smaller one that maps a library per
# rollout fails the mappings check below.
RSS_GROWTH_KIB = 6 * 1024


def test_rollouts_under_steady_load(cluster: RayCluster, tmp_path: Path, warm_cache: Path) -> None:
    app = {"cache_dir": str(warm_cache)}  # its replicas start from TINY's engine: the soak is about rollouts
    r = soak(cluster, tmp_path, seconds=60, rollout_every=8, clients=3, sample_every=4, app=app)
    summary = markdown({"date": "CI", "machine": "CI", "model": "tiny_cnn", "backend": "aoti", "device": "cpu", **r})
    assert r["failed"] == 0 and r["not_live"] == 0, summary
    assert r["rollouts"]["refused"] == 0 and r["rollouts"]["done"] >= 6, summary
    assert r["replicas_replaced"] == [], summary
    measured = r["rollouts"]["done"] - r["warmup_rollouts"]
    for name, rss in r["rss_kib"].items():
        assert "gone_at_sample" not in rss, (name, summary)
        if name.startswith("replica"):
            assert rss["growth"] <= RSS_GROWTH_KIB, (name, summary)
        # Counts have no allocator noise: fewer than one new thread or file per rollout, else one leaks.
        assert r["threads"][name]["growth"] < measured and r["fds"][name]["growth"] < measured, (name, summary)
    # A loaded library per swap (each aoti swap once loaded a fresh standby engine) shows here first.
    mapped = {name: g["growth"] for name, g in r["maps"].items() if g["growth"] >= measured}
    assert not mapped, f"memory mappings grow with every rollout: {mapped}\n{summary}"
