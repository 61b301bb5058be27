"""recalibrate: exact population statistics, weighted by batch size, and a model left as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from scale_models import mixed_bn_model as _model


def _batches(sizes=(2, 4, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * (i + 1) + 2 * i for i, n in enumerate(sizes)]


def _population_stats(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Directly: every BN's inputs over all batches (BNs in training, everything else in eval),
    concatenated, then mean and unbiased variance."""
    ref = copy.deepcopy(model).eval()
    inputs: dict[str, list] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x in batches:
            ref(x)
    out = {}
    for name, seen in inputs.items():
        x = torch.cat(seen)
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=1)  # (N, C, *) -> (C,)
        out[name] = (mean, var)
    return out


def test_recalibrate_sets_exact_population_statistics():
    model = _model()
    batches = _batches()
    expected = _population_stats(model, batches)
    assert batchnorm.recalibrate(model, batches) is model
    for name, (mean, var) in expected.items():
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)


def test_batches_are_weighted_by_size():
    # One sample at 0 and nine at 10: the population mean is 9, the mean of batch means 5.
    model = nn.Sequential(nn.BatchNorm1d(1)).double()
    batches = [torch.zeros(1, 1, 4, dtype=torch.float64), torch.full((9, 1, 4), 10.0, dtype=torch.float64)]
    batchnorm.recalibrate(model, batches)
    assert float(model[0].running_mean) == pytest.approx(9.0)
    assert float(model[0].running_var) == pytest.approx(torch.tensor([0.0] * 4 + [10.0] * 36).var().item())
    # torch's swa_utils.update_bn averages batch means with equal weights (what we fix)
    swa = nn.Sequential(nn.BatchNorm1d(1)).double()
    torch.optim.swa_utils.update_bn(batches, swa)
    assert float(swa[0].running_mean) == pytest.approx(5.0)


def test_restores_flags_momentum_counters_and_hooks():
    model = _model()
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batchnorm.recalibrate(model, _batches())
    assert [m.training for m in model.modules()] == flags
    assert [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    assert [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == tracked
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_dropout_is_off_during_the_pass():
    # With dropout active the statistics would be random; in eval they are exactly the input's.
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(2)).double().train()
    x = torch.randn(50, 2, dtype=torch.float64)
    batchnorm.recalibrate(model, [x])
    torch.testing.assert_close(model[1].running_mean, x.mean(0))
    assert model.training and model[0].training


class Boom(Exception):
    pass


def test_an_exception_midway_leaves_the_model_as_it_was():
    model = _model()
    model[5].momentum = 0.25
    model.train()
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]

    def batches():
        yield from _batches()[:2]
        raise Boom("the data loader failed")

    with pytest.raises(Boom):
        batchnorm.recalibrate(model, batches())
    torch.testing.assert_close(model.state_dict(), before)  # statistics included
    assert [m.training for m in model.modules()] == flags
    assert model[5].momentum == 0.25 and model[1].momentum == 0.1 and model[8].momentum == 0.1
    assert all(not m._forward_pre_hooks for m in model.modules())
    # a bad batch raising inside the model's forward: the same
    with pytest.raises(RuntimeError):
        batchnorm.recalibrate(model, [_batches()[0], torch.randn(2, 5, 5, 5, dtype=torch.float64)])
    torch.testing.assert_close(model.state_dict(), before)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_num_batches_and_dataloader_tuples():
    model, ref = _model(), _model()
    batches = _batches((3, 5, 2, 6))
    batchnorm.recalibrate(model, [(x, torch.zeros(len(x))) for x in batches], num_batches=2)
    batchnorm.recalibrate(ref, batches[:2])
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
    with pytest.warns(RuntimeWarning, match="asked for 9 batches, `batches` had only 4"):
        batchnorm.recalibrate(model, batches, num_batches=9)


def test_bad_arguments_and_nothing_to_do():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded no batch"):
        batchnorm.recalibrate(model, [])
    with pytest.raises(ValueError, match=r"num_batches must be a positive int or None \(got 0\)"):
        batchnorm.recalibrate(model, _batches(), num_batches=0)
    torch.testing.assert_close(model.state_dict(), before)


def test_layers_without_stats_are_skipped_and_unreached_ones_kept():
    torch.manual_seed(3)
    model = nn.ModuleDict({"used": nn.BatchNorm1d(2), "free": nn.BatchNorm1d(2, track_running_stats=False)})
    unused = nn.BatchNorm1d(2)
    model["unused"] = unused
    unused.running_mean.fill_(4.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = model

        def forward(self, x):
            return self.layers["free"](self.layers["used"](x))

    net = Net()
    x = torch.randn(8, 2)
    with pytest.warns(RuntimeWarning, match="1 BN layer\\(s\\) saw no input"):
        batchnorm.recalibrate(net, [x])
    torch.testing.assert_close(model["used"].running_mean, x.mean(0))
    assert torch.equal(unused.running_mean, torch.full((2,), 4.0))


def test_frozen_layers_keep_their_statistics():
    model = _model()
    batchnorm.freeze(model[5], affine=False)
    model[5].running_mean.fill_(3.0)
    batches = _batches()
    batchnorm.recalibrate(model, batches)
    assert torch.equal(model[5].running_mean, torch.full((2,), 3.0, dtype=torch.float64))
    assert batchnorm.is_frozen(model[5])  # freeze's hooks are not ours to remove
    # the others are recalibrated with the frozen layer normalizing by its running statistics
    expected = _population_stats_with_frozen(model, batches)
    torch.testing.assert_close(model[8].running_mean, expected, rtol=1e-10, atol=1e-12)


def _population_stats_with_frozen(model, batches):
    ref = copy.deepcopy(model).eval()
    ref[1].train(), ref[8].train()  # ref[5] stays in eval: it is frozen
    seen = []
    ref[8].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        for x in batches:
            ref(x)
    return torch.cat(seen).mean(0)


def test_a_channel_with_only_nonfinite_batches_keeps_its_statistics_in_torch_layers():
    # torch's layers update running = 1 * running + 0 * batch during the pass (momentum 0), which is
    # NaN for a NaN batch: the statistics a guarded channel keeps must be the ones from before the pass
    model = nn.Sequential(nn.BatchNorm1d(3), batchnorm.BatchNorm1d(3))
    before = [m.running_mean.clone() for m in model]
    x = torch.randn(5, 3)
    x[2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channels \[0\] had no finite statistics"):
        batchnorm.recalibrate(model, [x])
    assert torch.equal(model[0].running_mean[0], before[0][0]) and torch.isfinite(model[0].running_var).all()
