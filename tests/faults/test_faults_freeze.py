"""`freeze` under threads, pickling, deepcopy and `unfreeze`: the frozen state is read in forward,
`training` is never flipped, so concurrent forwards cannot leave a layer in eval for good."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import batchnorm

LAYERS = {
    "batchnorm": lambda: batchnorm.BatchNorm1d(8),
    "batchnorm_act": lambda: batchnorm.BatchNormAct1d(8, activation="relu"),
    "torch": lambda: nn.BatchNorm1d(8),
    "renorm": lambda: batchnorm.BatchRenorm1d(8),
    "ghost": lambda: batchnorm.GhostBatchNorm1d(8, virtual_batch_size=4),
    "sync": lambda: batchnorm.SyncBatchNorm(8),
}


def model_with(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), LAYERS[kind](), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # running statistics unlike any batch's, so a use of batch statistics shows
        m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(2, 3)
    return m


def frozen_matches_eval(m: nn.Sequential, x: torch.Tensor) -> None:
    """In training mode, a frozen model computes what the same model computes in eval."""
    reference = copy.deepcopy(m)
    batchnorm.unfreeze(reference).eval()
    torch.testing.assert_close(m.train()(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_concurrent_forwards_leave_training_flags_alone(kind):
    m = batchnorm.freeze(model_with(kind))
    m.train()
    stats = [t.clone() for t in m[1].buffers()]
    seen_flags = []
    m[1].register_forward_pre_hook(lambda mod, args: seen_flags.append(mod.training))
    barrier = threading.Barrier(4)
    errors = []

    def worker(seed):
        try:
            barrier.wait()
            g = torch.Generator().manual_seed(seed)
            for _ in range(30):
                m(torch.randn(16, 4, generator=g))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert m[1].training, "a frozen layer's training flag was left False by concurrent forwards"
    assert all(seen_flags), "freeze flipped the layer's training flag during a forward"
    for before, after in zip(stats, m[1].buffers()):
        assert torch.equal(before, after), "a frozen layer's running statistics changed"
    batchnorm.unfreeze(m)
    m(torch.randn(16, 4))
    assert not torch.equal(stats[0], m[1].running_mean), "after unfreeze, training must update the statistics again"


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_frozen_state_survives_copies_and_unfreeze(kind, how):
    m = batchnorm.freeze(model_with(kind))
    if how == "deepcopy":
        c = copy.deepcopy(m)
    elif how == "pickle":
        c = pickle.loads(pickle.dumps(m))
    else:
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        c = torch.load(buffer, weights_only=False)
    x = torch.randn(16, 4)
    assert batchnorm.is_frozen(c[1])
    frozen_matches_eval(c, x)
    before = c[1].running_mean.clone()
    c.train()(x)
    assert torch.equal(c[1].running_mean, before)
    # the copy's freeze belongs to the copy: unfreezing it leaves the original frozen, and back
    batchnorm.unfreeze(c)
    assert not batchnorm.is_frozen(c[1]) and batchnorm.is_frozen(m[1])
    c.train()(x)
    assert not torch.equal(c[1].running_mean, before)
    frozen_matches_eval(m, x)
