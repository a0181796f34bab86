"""Checkpoints: nothing pickled, temp folders ignored, pruning, exact optimizer/RNG round trip."""

import random

import numpy as np
import pytest
import torch

from text4vpr.train import checkpoint as ckpt


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_opt()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, [ckpt.rng_state()], keep_last=2)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())
    model2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(path, model2, opt2)
    assert state == {"step": 3}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_pruning_and_temp_folders(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"step": step}, [ckpt.rng_state()], keep_last=2)
    (tmp_path / ".tmp-step-00000009").mkdir()  # a write killed midway
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000003"
    assert ckpt.resolve_resume("", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / ".tmp-step-00000009"), tmp_path)


def test_weights_only_torch_load_refuses_types_not_listed(tmp_path):
    """What DeepSpeed/Accelerate load with weights_only=False is forced to weights_only=True."""
    import pickle
    from fractions import Fraction

    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "extra": Fraction(1, 3)}, path)
    assert torch.load(path, weights_only=False)["extra"] == Fraction(1, 3)  # an unsafe load would take it
    with ckpt.weights_only_torch_load([]):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=False)
    with ckpt.weights_only_torch_load([Fraction]):
        assert torch.load(path, weights_only=False)["extra"] == Fraction(1, 3)
    assert torch.load(path, weights_only=False)["extra"] == Fraction(1, 3)  # torch.load restored afterwards
