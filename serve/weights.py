"""Read weights (safetensors or a torch state dict, from a path or fsspec URL), validate them, make demo ones."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from warmserve.cache.atomic import atomic_write
from warmserve.serve.errors import WeightsError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _read_bytes(uri: str) -> bytes:
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        try:
            return path.read_bytes()
        except OSError as e:
            raise WeightsError(f"cannot read weights {uri}: {e.strerror or e}") from e
    try:
        import fsspec

        with fsspec.open(uri, "rb") as f:
            return bytes(f.read())
    except Exception as e:  # any fsspec backend error: the message names the URL
        raise WeightsError(f"cannot read weights {uri}: {type(e).__name__}: {e}") from e


def weights_digest(uri: str) -> str:
    """sha256 of the weights file at ``uri``: the identity a version label is bound to."""
    return hashlib.sha256(_read_bytes(uri)).hexdigest()


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict and the sha256 of the file it came from."""

    state: StateDict
    sha256: str


def read_weights(uri: str, sha256: str | None = None) -> LoadedWeights:
    """Read a weights file once; with ``sha256``, refuse a file whose content is not that digest."""
    data = _read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise WeightsError(
            f"{uri} changed: its sha256 is {digest[:16]}..., but these weights were rolled out as "
            f"{sha256[:16]}...; restore that file or roll the new one out under a new version label"
        )
    return LoadedWeights(_parse(uri, data), digest)


def load_weights(uri: str) -> StateDict:
    """A state dict from ``.safetensors`` (preferred) or a ``torch.save`` file; nothing is unpickled."""
    return read_weights(uri).state


SAVE_HINT = (
    "save weights with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') "
    "or torch.save(model.state_dict(), 'weights.pt')"
)


def _parse(uri: str, data: bytes) -> StateDict:
    if uri.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return dict(load(data))
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{uri} is not a valid safetensors file ({e}); {SAVE_HINT}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text advises loading with weights_only=False: never right for a server. Say what it held.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise WeightsError(f"{uri} is neither safetensors nor a torch state dict; {SAVE_HINT}") from e
        raise WeightsError(
            f"{uri} is not a state dict of tensors: it pickles a {found.group(1)} object, and warmserve never "
            f"unpickles objects; {SAVE_HINT}"
        ) from e
    except Exception as e:  # torch raises many types for a file that is not a torch.save archive
        raise WeightsError(
            f"{uri} is neither safetensors nor a torch state dict ({type(e).__name__}); {SAVE_HINT}"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri} does not hold a flat state dict of tensors; {SAVE_HINT}")
    return {str(k): v for k, v in obj.items()}


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes the model's state dict must have."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def validate(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise ``WeightsError`` listing every problem: missing/unexpected keys, shapes, dtypes, NaN/inf."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, (shape, dtype) in expected.items():
        t = state.get(name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            problems.append(f"{name}: shape {tuple(t.shape)}, model needs {shape}")
        elif t.dtype != dtype:
            problems.append(f"{name}: dtype {t.dtype}, model needs {dtype}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: contains NaN or inf")
    if problems:
        raise WeightsError("weights do not fit the model: " + "; ".join(problems[:10]))


def demo_weights(model: nn.Module | Mapping[str, tuple[tuple[int, ...], torch.dtype]], seed: int = 0) -> StateDict:
    """Seeded random weights of the right shapes (the embedded default: no model hub is reachable), for a
    module or for the names, shapes and dtypes its state dict has (`expected_tensors`)."""
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    tensors = expected_tensors(model) if isinstance(model, nn.Module) else model
    for name, (shape, dtype) in tensors.items():
        if not dtype.is_floating_point:
            out[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif name.endswith("running_mean") or name.endswith("bias"):
            out[name] = torch.randn(shape, generator=g) * 0.01
        elif len(shape) <= 1:  # norm scales
            out[name] = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:
            fan_in = max(1, math.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        out[name] = out[name].to(dtype)
    return out


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def ensure_demo_weights(
    model_spec: str,
    model: nn.Module | Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    directory: Path,
    seed: int = 0,
) -> str:
    """Path of the demo weights for ``model_spec``, written once (atomically) on first use."""
    name = model_spec.replace(":", "-").replace("/", "_")
    path = directory / f"demo-{name}-seed{seed}.safetensors"
    if not path.exists():
        logger.info("writing seeded demo weights to %s", path)
        save_weights(demo_weights(model, seed), path)
    return str(path)
