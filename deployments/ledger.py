"""The last good rollout per application and model, kept where `warmserve run` finds it after a restart.

`warmserve rollout` writes it once every replica serves the new weights; `warmserve run` reads it and
starts on those weights (unless told otherwise), so a restart never goes back to older weights unnoticed.
The file also keeps the digest of every version label seen, because a label names one content.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from warmserve.cache.atomic import atomic_write


@dataclass(frozen=True)
class Rollout:
    """Weights every replica of ``app`` served at ``at`` (epoch seconds); ``versions`` maps label -> sha256."""

    app: str
    model: str
    weights: str
    version: str
    sha256: str
    at: float = field(default_factory=time.time)
    versions: Mapping[str, str] = field(default_factory=dict)

    def user_config(self) -> dict[str, Any]:
        """The ``user_config`` keys that make replicas serve these weights."""
        return {
            "weights": self.weights,
            "weights_version": self.version,
            "weights_sha256": self.sha256,
            "versions": dict(self.versions),
        }


def _path(directory: Path, app: str, model: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{app}--{model}")
    return directory / "rollouts" / f"{safe}.json"


def record(directory: Path, rollout: Rollout) -> Path:
    """Write ``rollout`` as the last good one for its app and model (atomically)."""
    path = _path(directory, rollout.app, rollout.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(rollout), indent=1).encode())
    return path


def last(directory: Path, app: str, model: str) -> tuple[Rollout, Path] | None:
    """The last good rollout recorded for ``app`` and ``model``, with its file, or None."""
    path = _path(directory, app, model)
    try:
        doc = json.loads(path.read_bytes())
        return Rollout(**doc), path
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise ValueError(f"the rollout record {path} is unreadable ({e}); delete it or run with --no-resume") from e
