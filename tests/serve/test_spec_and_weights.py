"""Model specs, input specs and weights: every bad input gets a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.serve.conftest import TINY
from warmserve.serve.errors import ModelSpecError, WeightsError
from warmserve.serve.model import architecture_doc, build_model, class_names
from warmserve.serve.spec import InputSpec, ModelSpec, parse_batch, parse_shape
from warmserve.serve.weights import demo_weights, expected_tensors, load_weights, save_weights, validate


def test_parsers() -> None:
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_batch("1:32") == (1, 32) and parse_batch("8") == (8, 8)
    for bad in ("", "3,a", "0,2"):
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)
    for bad in ("0:4", "5:2", "x"):
        with pytest.raises(ValueError, match="batch"):
            parse_batch(bad)
    with pytest.raises(ValueError, match="dtype"):
        InputSpec(dtype="int8")
    with pytest.raises(ValueError, match="precision"):
        ModelSpec(precision="fp8")
    with pytest.raises(ValueError, match="unknown setting"):
        ModelSpec.from_mapping({"modle": "torchvision:resnet18"})
    spec = ModelSpec.from_mapping({"model": "torchvision:resnet18", "input_shape": "3,64,64", "batch": "2:4"})
    assert spec.input.shape == (3, 64, 64) and spec.input.export_batch == 2 and spec.name == "resnet18"


def test_model_specs() -> None:
    assert isinstance(build_model("torchvision:resnet18", meta=True), torch.nn.Module)
    with pytest.raises(ModelSpecError, match="no model 'resnet9000'"):
        build_model("torchvision:resnet9000")
    with pytest.raises(ModelSpecError, match=r"no model 'resnet81' \(did you mean resnet18, "):
        build_model("torchvision:resnet81")
    with pytest.raises(ModelSpecError, match=r"no model 'bert' \(some that exist: alexnet, "):
        build_model("torchvision:bert")
    with pytest.raises(ModelSpecError, match="cannot import"):
        build_model("no.such.module:factory")
    # A torchvision name without its source: the full names it may have meant
    with pytest.raises(ValueError, match=r"got 'ResNet18' \(did you mean torchvision:resnet18\?\)$"):
        ModelSpec(model="ResNet18")
    with pytest.raises(ModelSpecError, match=r"got 'resnet19' \(did you mean torchvision:resnet18, "):
        build_model("resnet19")
    with pytest.raises(ValueError, match=r"package\.module:factory, got 'bert'$"):
        ModelSpec(model="bert")
    with pytest.raises(ModelSpecError, match=r"not a torch\.nn\.Module"):
        build_model("tests.serve.models:not_a_module")
    labels = class_names("torchvision:resnet18", 1000)
    assert labels[0] == "tench" and len(labels) == 1000
    assert class_names(TINY, 10)[3] == "class_3"


def test_architecture_fingerprint_is_weight_agnostic() -> None:
    a, b = build_model(TINY), build_model(TINY)
    with torch.no_grad():
        b.conv.weight.mul_(3)  # type: ignore[operator]
    assert architecture_doc(a) == architecture_doc(b)
    assert architecture_doc(a) != architecture_doc(build_model("tests.serve.models:tiny_cnn_wide"))


def test_weights_roundtrip_and_validation(tmp_path: Path) -> None:
    model = build_model(TINY)
    expected = expected_tensors(model)
    state = demo_weights(model, seed=1)
    save_weights(state, tmp_path / "w.safetensors")
    loaded = load_weights(str(tmp_path / "w.safetensors"))
    validate(loaded, expected)
    torch.save(state, tmp_path / "w.pt")
    validate(load_weights(str(tmp_path / "w.pt")), expected)
    validate(load_weights(f"file://{tmp_path}/w.safetensors"), expected)

    missing = {k: v for k, v in state.items() if k != "conv.weight"}
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): conv.weight"):
        validate(missing, expected)
    with pytest.raises(WeightsError, match="unexpected"):
        validate({**state, "extra": torch.zeros(1)}, expected)
    with pytest.raises(WeightsError, match="shape"):
        validate({**state, "head.bias": torch.zeros(11)}, expected)
    with pytest.raises(WeightsError, match="dtype"):
        validate({**state, "head.bias": torch.zeros(10, dtype=torch.float64)}, expected)
    nan = state["head.weight"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(WeightsError, match="NaN"):
        validate({**state, "head.weight": nan}, expected)


def test_unreadable_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(str(tmp_path / "absent.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_weights(str(tmp_path / "bad.safetensors"))
    torch.save({"w": torch.zeros(1), "note": "a string"}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="flat state dict"):
        load_weights(str(tmp_path / "mixed.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="neither safetensors nor"):
        load_weights(str(tmp_path / "junk.pt"))


class Note:
    """An object a checkpoint might pickle next to its tensors."""


def test_weights_errors_say_what_to_send(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1), "note": Note()}, tmp_path / "objects.pt")
    with pytest.raises(WeightsError) as e:
        load_weights(str(tmp_path / "objects.pt"))
    text = str(e.value)
    assert "Note object" in text and "never unpickles" in text and "save_file(model.state_dict()" in text
    assert "weights_only" not in text  # torch's advice to switch it off is never right for a server


def test_a_pinned_digest_refuses_other_content(tmp_path: Path) -> None:
    from warmserve.serve.weights import read_weights, weights_digest

    model = build_model(TINY)
    save_weights(demo_weights(model, seed=1), tmp_path / "w.safetensors")
    digest = weights_digest(str(tmp_path / "w.safetensors"))
    assert read_weights(str(tmp_path / "w.safetensors"), digest).sha256 == digest
    save_weights(demo_weights(model, seed=2), tmp_path / "w.safetensors")  # same name, other content
    with pytest.raises(WeightsError, match="changed: its sha256 is"):
        read_weights(str(tmp_path / "w.safetensors"), digest)
