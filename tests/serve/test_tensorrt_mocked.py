"""The TensorRT engine's refit with torch_tensorrt mocked (no machine here can build a TensorRT engine; the real
path runs in tests/gpu): a refit exports the engine's own copy of the model and never writes to the worker's."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from tests.serve.conftest import tiny_spec
from tests.serve.models import TinyCNN
from warmserve.serve.backends.tensorrt import TensorRTEngine, skeleton


@pytest.fixture
def mocked_torch_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``refit_module_weights`` returns the refitted program as a module: it serves the weights it was given."""
    fake = types.ModuleType("torch_tensorrt")
    dynamo = types.ModuleType("torch_tensorrt.dynamo")
    dynamo.refit_module_weights = lambda module, program, **kw: program.module()  # type: ignore[attr-defined]
    fake.dynamo = dynamo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setitem(sys.modules, "torch_tensorrt.dynamo", dynamo)


def test_skeleton_holds_no_weights_and_shares_nothing() -> None:
    model = TinyCNN().eval()
    copy_ = skeleton(model)
    assert all(t.device.type == "meta" for t in copy_.state_dict().values())
    assert not copy_.training and model.conv.weight.device.type == "cpu"


@pytest.mark.usefixtures("mocked_torch_tensorrt")
def test_refits_leave_the_serving_model_as_it_was_mocked_tensorrt() -> None:
    spec = tiny_spec().input
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TensorRTEngine(module=model, model=model, spec=spec, device=torch.device("cpu"))
    for step in (1, 2):  # twice: the engine's copy takes weights again after its first refit
        new = {k: v + 0.1 * step if v.is_floating_point() else v for k, v in before.items()}
        engine.refit(new)
        eager = copy.deepcopy(model)
        eager.load_state_dict(new)
        x = spec.example(seed=step)
        torch.testing.assert_close(engine([x])[0], eager.eval()(x))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # refused or not, a refit never reaches what serves
