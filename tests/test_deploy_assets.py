"""The files operators use directly: Dockerfile, Serve config, Prometheus config, Grafana dashboard."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from warmserve.serve.metrics import SPECS
from warmserve.serve.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    logical, out = "", []
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = logical.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            logical = ""
    return out


def test_dockerfile_parses_and_copies_what_exists() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "ARG" and any(word == "FROM" for word, _ in instructions)
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "VOLUME", "EXPOSE", "CMD", "LABEL", "USER"}
    assert {word for word, _ in instructions} <= known
    copies = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    assert copies
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    cmd = next(rest for word, rest in instructions if word == "CMD")
    assert json.loads(cmd) == ["warmserve", "run", "--host", "0.0.0.0"]
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "compileall" in runs  # no module compiled from source in a new replica


def test_serve_config_is_valid() -> None:
    from warmserve.deployments.runner import serve_schema

    config = yaml.safe_load((ROOT / "deployments" / "config.yaml").read_text())
    scaling = serve_schema(config).applications[0].deployments[0].autoscaling_config
    # Replicas report their load every second, averaged over 2 s (Serve's own 10 s and 30 s put a load step's
    # decision 20 s after it; 1 s and 5 s, 12 s).
    assert (scaling["metrics_interval_s"], scaling["look_back_period_s"]) == (1, 2)
    app = config["applications"][0]
    Settings.load(args=app["args"], environ={})
    assert app["deployments"][0]["user_config"]["weights_version"] == app["args"]["weights_version"]


def test_dashboard_and_scrape_config_use_real_metric_names() -> None:
    dashboard = json.loads((ROOT / "deployments" / "grafana-dashboard.json").read_text())
    exported = set()
    for spec in SPECS.values():
        base = f"ray_{spec.name}"
        exported |= {f"{base}_total"} if spec.kind == "counter" else {base}
        if spec.kind == "histogram":
            exported |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_warmserve_\w+", target["expr"]):
                assert name in exported, f"panel {panel['title']!r} uses unknown metric {name}"
    prom = yaml.safe_load((ROOT / "deployments" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "ray"


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    """`pip install warmserve` puts warmserve alone at the top of site-packages: the repository's cache/, serve/
    and deployments/ inside it (warmserve.cache, ...), with every module and the config the command reads."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # setuptools writes build/ next to the sources: a copy keeps the checkout clean
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "warmserve", "cache", "serve", "deployments"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("warmserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"warmserve", wheel.name.split("-py")[0] + ".dist-info"}
    modules = {
        f"warmserve/{p.relative_to(ROOT)}"
        for room in ("cache", "serve", "deployments")
        for p in (ROOT / room).rglob("*.py")
    }
    assert modules <= set(names)
    assert "warmserve/deployments/config.yaml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "warmserve = warmserve.deployments.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
