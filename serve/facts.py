"""What a warm start needs to know about a model, kept per node, so that a start from the cache builds no module.

Building a torchvision module imports torchvision, and torchvision imports Dynamo: 4.5-6 s of a GPU replica's
10-11 s start (H200, torch 2.11), where loading the engine takes 0.5 s. A start that built the module records
its facts: the architecture fingerprint (the cache key's part), the names, shapes and dtypes its weights must
have, its outputs and labels, and, per weights file, eager PyTorch's answer to the verification probe. The next
start of the same model reads them and builds the module only when something needs it: a build, an eager
reference for weights no start has verified here, a backend that runs the module itself.

Facts are kept only for torchvision models, whose code is known without importing it: by the installed torch
and torchvision distributions (their versions and their lists of files with each file's hash, RECORD). A model
of your own (``package.module:factory``) is built at every start, as its code can change with no version to say
so. With a signing key, facts are signed as cache entries are, and unsigned or forged ones are ignored.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from warmserve.cache.atomic import atomic_write
from warmserve.serve.batching import OutputSpec

logger = logging.getLogger(__name__)

FORMAT = 1
MAX_REFERENCE_BYTES = 16 << 20  # a probe answer larger than this is computed by eager PyTorch at every start

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, path: Path, data: bytes) -> str:
    """HMAC-SHA256 over a file's name (which names the facts' identity, and an answer's weights, device and
    probe) and its content: a signed file copied under another name is refused."""
    return hmac.new(key, path.name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


@functools.cache  # read once per process: the installed distributions do not change under it
def installed(package: str) -> dict[str, str] | None:
    """The installed distribution of ``package`` (its version and the digest of its RECORD), or None when it
    has no RECORD or is not the one Python imports (another copy earlier on the path, say)."""
    try:
        dist = importlib.metadata.distribution(package)
        record = dist.read_text("RECORD")
        spec = importlib.util.find_spec(package)  # finds the package without importing it
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError) as e:
        logger.debug("no model facts for %s models: %s: %s", package, type(e).__name__, e)
        return None
    if not record or spec is None or spec.origin is None:
        logger.debug("no model facts for %s models: its installation has no RECORD", package)
        return None
    if Path(str(dist.locate_file(f"{package}/__init__.py"))).resolve() != Path(spec.origin).resolve():
        logger.debug("no model facts for %s models: Python imports another copy than %s", package, dist.version)
        return None
    return {"version": dist.version, "record": _sha256(record)}


def code_identity(model: str) -> dict[str, Any] | None:
    """What identifies ``model``'s code without importing it, or None for a model that must be built to be known."""
    if model.partition(":")[0] != "torchvision":
        return None
    found = {name: installed(name) for name in ("torch", "torchvision")}
    if any(v is None for v in found.values()):
        return None
    return found


def numerics() -> dict[str, Any]:
    """What else an eager answer depends on: the CUDA and cuDNN libraries (packaged apart from torch) and
    whether float32 matrix products may use TF32."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "matmul_precision": torch.get_float32_matmul_precision(),
    }


@dataclass(frozen=True)
class ModelFacts:
    """A model as its start sees it, without the module."""

    architecture: dict[str, Any]
    expected: Expected
    outputs: list[OutputSpec]
    labels: list[str]

    def doc(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "expected": [[k, list(s), str(d).removeprefix("torch.")] for k, (s, d) in self.expected.items()],
            "outputs": [[o.name, o.dtype, list(o.shape)] for o in self.outputs],
            "labels": self.labels,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ModelFacts:
        expected: Expected = {}
        for name, shape, dtype in doc["expected"]:
            t = getattr(torch, dtype)
            if not isinstance(t, torch.dtype):
                raise TypeError(f"{dtype!r} is not a torch dtype")
            expected[str(name)] = (tuple(int(n) for n in shape), t)
        outputs = [OutputSpec(str(n), str(d), tuple(s)) for n, d, s in doc["outputs"]]
        return cls(dict(doc["architecture"]), expected, outputs, [str(x) for x in doc["labels"]])


class FactsStore:
    """The facts of one model spec (model, input signature, precision, output names) in ``directory``.

    ``derivation`` identifies the code that computes them (facts recorded by another warmserve are not read;
    None keeps none). Every read failure (a missing, corrupt, unsigned or stale file) is a
    miss, and the start builds the module and records them again."""

    def __init__(
        self,
        directory: Path,
        spec_doc: Mapping[str, Any],
        derivation: str | None,
        signing_key: bytes | None = None,
    ) -> None:
        self.directory = directory
        self.signing_key = signing_key
        code = code_identity(str(spec_doc["model"]))
        self.id: str | None = None
        if code is not None and derivation is not None:
            doc = {"format": FORMAT, "spec": dict(spec_doc), "code": code, "derivation": derivation}
            self.id = _sha256(_canonical(doc))

    @property
    def enabled(self) -> bool:
        return self.id is not None

    def _path(self) -> Path:
        return self.directory / f"{self.id}.json"

    def _signed(self, path: Path, data: bytes, signature: str | None) -> bool:
        if self.signing_key is None:
            return True
        return signature is not None and hmac.compare_digest(_mac(self.signing_key, path, data), signature)

    def load(self) -> ModelFacts | None:
        if self.id is None:
            return None
        path = self._path()
        try:
            raw = json.loads(path.read_bytes())
            body = raw["facts"]
            if not self._signed(path, _canonical(body), raw.get("signature")):
                logger.warning("model facts %s are unsigned or forged; building the module", path)
                return None
            return ModelFacts.from_doc(body)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("model facts %s unreadable (%s: %s); building the module", path, type(e).__name__, e)
            return None

    def save(self, facts: ModelFacts) -> None:
        if self.id is None:
            return
        body = facts.doc()
        doc: dict[str, Any] = {"facts": body}
        if self.signing_key is not None:
            doc["signature"] = _mac(self.signing_key, self._path(), _canonical(body))
        self._write(self._path(), json.dumps(doc).encode())

    # -- eager PyTorch's answers to the verification probe, per weights file --------------------------------
    def _reference_path(self, weights_sha256: str, device: Mapping[str, Any], probe: Sequence[torch.Tensor]) -> Path:
        h = hashlib.sha256()
        for x in probe:
            h.update(f"{x.dtype}{list(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        doc = {
            "facts": self.id,
            "weights": weights_sha256,
            "device": dict(device),
            "probe": h.hexdigest(),
            "numerics": numerics(),
        }
        return self.directory / f"{self.id}-answer-{_sha256(_canonical(doc))[:32]}.safetensors"

    def reference(
        self, weights_sha256: str, device: Mapping[str, Any], probe: Sequence[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Eager's recorded answer to ``probe`` with the weights file of that digest on this kind of device."""
        if self.id is None or not weights_sha256:
            return None
        path = self._reference_path(weights_sha256, device, probe)
        try:
            data = path.read_bytes()
            sig = path.with_suffix(".sig").read_bytes() if self.signing_key is not None else None
            signature = sig.decode("ascii").strip() if sig is not None else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("recorded answer %s unreadable (%s); asking eager PyTorch", path, e)
            return None
        if not self._signed(path, data, signature):
            logger.warning("recorded answer %s is unsigned or forged; asking eager PyTorch", path)
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
            return [tensors[f"output{i}"] for i in range(len(tensors))]
        except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
            logger.warning("recorded answer %s corrupt (%s); asking eager PyTorch", path, e)
            return None

    def save_reference(
        self,
        weights_sha256: str,
        device: Mapping[str, Any],
        probe: Sequence[torch.Tensor],
        answer: Sequence[torch.Tensor],
    ) -> None:
        if self.id is None or not weights_sha256:
            return
        if sum(t.numel() * t.element_size() for t in answer) > MAX_REFERENCE_BYTES:
            return
        from safetensors.torch import save

        data = save({f"output{i}": t.detach().cpu().contiguous() for i, t in enumerate(answer)})
        path = self._reference_path(weights_sha256, device, probe)
        if self.signing_key is not None:
            self._write(path.with_suffix(".sig"), _mac(self.signing_key, path, data).encode())
        self._write(path, data)

    def forget_reference(self, weights_sha256: str, device: Mapping[str, Any], probe: Sequence[torch.Tensor]) -> None:
        """Drop a recorded answer the engine disagreed with: eager is asked again, and its answer recorded."""
        if self.id is None:
            return
        path = self._reference_path(weights_sha256, device, probe)
        for p in (path, path.with_suffix(".sig")):
            p.unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        """Facts are an optimisation: a full disk or a read-only cache directory costs the next start, no more."""
        try:
            atomic_write(path, data)
        except OSError as e:
            logger.warning("cannot record model facts in %s: %s", path.parent, e)
