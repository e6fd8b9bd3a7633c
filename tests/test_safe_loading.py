"""No pickle is ever executed: checkpoints load with weights_only=True."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from conftest import UserCNN
from lightning_qsec import load_quantized_checkpoint, quantize_model, safe_load

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path("/tmp/qsec-pwned"),))


def test_pickled_payload_is_refused(tmp_path):
    marker = pathlib.Path("/tmp/qsec-pwned")
    marker.unlink(missing_ok=True)
    model = quantize_model(UserCNN(), weight_bit_width=4, act_bit_width=4)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": model.state_dict(), "qsec_config": {"weight_bit_width": 4}, "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"refused to load .*evil\.ckpt.*weights_only=True"):
        safe_load(path)
    with pytest.raises(ValueError, match="refused to load"):
        load_quantized_checkpoint(UserCNN(), path)
    assert not marker.exists()


def test_plain_checkpoint_round_trips(tmp_path):
    model = quantize_model(UserCNN(), weight_bit_width=4, act_bit_width=4).eval()
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": model.state_dict(), "qsec_config": model.qsec_config}, path)
    loaded = load_quantized_checkpoint(UserCNN(), path)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_of_another_model_leaves_the_model_float(tmp_path):
    from lightning_qsec import is_quantized
    from lightning_qsec.models import TabularMLP

    model = quantize_model(UserCNN(), weight_bit_width=4, act_bit_width=4).eval()
    path = tmp_path / "cnn.pt"
    torch.save({"state_dict": model.state_dict(), "qsec_config": model.qsec_config}, path)
    other = TabularMLP(64, hidden=(16,))
    with pytest.raises(ValueError, match="keys do not match the model"):
        load_quantized_checkpoint(other, path)
    assert not is_quantized(other)  # still usable: nothing was swapped
    shapes = torch.load(path, weights_only=True)
    key = next(k for k in shapes["state_dict"] if k.endswith("weight"))
    shapes["state_dict"][key] = torch.zeros(3)
    torch.save(shapes, tmp_path / "shapes.pt")
    fresh = UserCNN()
    with pytest.raises(ValueError, match=re.escape(f"{key} (3,) vs")):
        load_quantized_checkpoint(fresh, tmp_path / "shapes.pt")
    assert not is_quantized(fresh)


def test_no_unsafe_torch_load_in_the_project():
    offenders = []
    for path in list((ROOT / "lightning_qsec").rglob("*.py")) + list((ROOT / "examples").rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py")):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert not offenders, offenders
