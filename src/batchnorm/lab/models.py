"""The tutorials' networks, with and without BN, built from our layers.

    circles_net(norm)        seed 000: 2-64-32-2 MLP, BN after each hidden Linear
    mnist_mlp(norm)          seed 002: 784-100-10 MLP whose BN is the hand-written functional form
    mnist_cnn(norm)          seed 002: Conv(1,6,3,p=1)-BN-ReLU-Pool-Conv(6,16,5)-BN-ReLU-Pool-Linear(400,10)
    deep_mlp(depth, norm)    the depth and batch-size sweeps: `depth` hidden Linear(-BN)-ReLU blocks

`norm` names a row of NORMS: "none", "bn", "bn-seed002" (seed 002's own running-statistics rule,
for comparison), "ghost" (GhostBatchNorm1d) or "renorm" (BatchRenorm1d). The sweeps compare
whatever names they are given, so a new variant joins them by adding one row here.

BN layers draw no random numbers at construction (weight=1, bias=0), so with the same seed the
Linear and Conv layers of the BN and the no-BN net start from identical weights: the comparison
differs only by BN.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import functional as F

__all__ = ["NORMS", "FunctionalBatchNorm", "Seed002BatchNorm", "LabGhostBatchNorm1d", "circles_net", "mnist_mlp", "mnist_cnn", "deep_mlp", "ghost_layer", "PopulationBatchNorm1d", "Seed002Network", "check_norm"]


class FunctionalBatchNorm(nn.Module):
    """Seed 002's hand-written BN: gamma/beta as Parameters, running stats as buffers, one call.

    The tutorial's `batch_norm_1d` uses the opposite momentum convention (0.1 weighs the *old*
    value), stores the biased variance and starts `moving_var` at zero. This follows PyTorch
    instead (see batchnorm.functional: momentum weighs the new batch, running_var is unbiased and
    starts at one) and initializes gamma=1, beta=0 where the tutorial draws them from randn.
    (N, C) -> (N, C).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.gamma, self.beta,
            training=self.training, momentum=self.momentum, eps=self.eps, layer=self,
        )

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}, momentum={self.momentum}, eps={self.eps}"


class Seed002BatchNorm(nn.Module):
    """BN with seed 002's running-statistics rule, kept only to show the difference. NOT the library's.

    Seed 002's `batch_norm_1d` updates its moving averages with the opposite momentum convention,
        moving = momentum * moving + (1 - momentum) * batch      (momentum=0.1: the batch weighs 0.9)
    stores the *biased* batch variance, and starts both moving averages at zero. Training-time
    normalization is the same as everywhere (batch mean, biased variance); only the statistics used
    in eval mode differ. (N, C) -> (N, C).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.zeros(num_features))  # seed 002 starts at 0, torch at 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.gamma, self.beta,
                                training=False, eps=self.eps)
        with torch.no_grad():
            mean, var = F.batch_stats(x)  # (N, C) -> (C,), (C,); var is biased, as seed 002 keeps it
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean.to(self.running_mean.dtype))
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var.to(self.running_var.dtype))
        return F.batch_norm(x, None, None, self.gamma, self.beta, training=True, eps=self.eps)


class Seed002Network(nn.Module):
    """Seed 002's multi_network, faithfully: (N, 1, 28, 28) -> (N, 10). NOT the library's BN.

    Built in the tutorial's order (layer1, layer2, then gamma and beta drawn from randn, moving
    averages at 0), so with the same seed its Linear weights are the no-BN net's. Its forward is
    the tutorial's `forward(x, is_train=True)`, and nothing in seed 002 ever passes is_train=False
    (`net.eval()` does not change it): every forward, test batches included, normalizes with the
    batch's own statistics and updates the moving averages by seed 002's rule (momentum 0.1 on the
    old value, biased variance), which never enter a reported number. They are buffers here only so
    that --resume brings them back.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.layer1 = nn.Linear(784, 100)
        self.relu = nn.ReLU()
        self.layer2 = nn.Linear(100, 10)
        self.gamma = nn.Parameter(torch.randn(100))
        self.beta = nn.Parameter(torch.randn(100))
        self.register_buffer("moving_mean", torch.zeros(100))
        self.register_buffer("moving_var", torch.zeros(100))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer1(x.flatten(1))  # (N, 784) -> (N, 100)
        mean = h.mean(dim=0, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=0, keepdim=True)  # biased, as the tutorial computes it
        with torch.no_grad():
            self.moving_mean.mul_(self.momentum).add_((1 - self.momentum) * mean.squeeze(0))
            self.moving_var.mul_(self.momentum).add_((1 - self.momentum) * var.squeeze(0))
        h = self.gamma * (h - mean) / torch.sqrt(var + self.eps) + self.beta
        return self.layer2(self.relu(h))


class LabGhostBatchNorm1d(batchnorm.GhostBatchNorm1d):
    """GhostBatchNorm1d that takes any batch the sweeps' loader makes. (N, C) -> (N, C).

    An epoch's last batch is short (1257 digits in batches of 16 leave 9), and cut into virtual
    batches of 4 it would end in a chunk of one sample, which BN cannot normalize and the library's
    layer rightly refuses. Here that sample joins the chunk before it (4, 4, 1 -> 4, 5): the same
    layer, state_dict and eval, and a one-sample chunk never happens.
    """

    def _batch_norm(self, x: Tensor, weight, bias, running_mean, running_var, *, training, momentum, counter=None, mask=None) -> Tensor:
        size = self.virtual_batch_size
        if not (self._uses_batch_statistics() and x.shape[0] > size and x.shape[0] % size == 1):
            return super()._batch_norm(
                x, weight, bias, running_mean, running_var, training=training, momentum=momentum, counter=counter, mask=mask
            )
        cut = x.shape[0] - size - 1  # chunks of `size` before, one of size + 1 after
        state = (weight, bias, running_mean, running_var)
        # first: running stats follow chunk order
        head = [super()._batch_norm(x[:cut], *state, training=True, momentum=momentum, counter=counter)] if cut else []
        # one chunk, BN on its own statistics (momentum=None: its weight after the head's chunks)
        momentum = self._momentum(counter is not None, counter)
        last = batchnorm.BatchNorm1d._batch_norm(self, x[cut:], *state, training=True, momentum=momentum, counter=counter)
        return torch.cat([*head, last], dim=0)


class PopulationBatchNorm1d(batchnorm.BatchNorm1d):
    """BN without batch noise, the regularization experiment's control. NOT a layer to train with.

    In training it normalizes with its running statistics as they were before the batch (constants
    in the step: no gradient flows through them, and no example's output depends on the others in
    its batch), and then updates them from the batch as BN does (momentum 0.1, unbiased variance). So it normalizes
    with an estimate of the population statistics that changes slowly over steps: what BN computes,
    minus the noise of each batch's own statistics. Eval mode is BN's. (N, C) -> (N, C).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        # the statistics before this batch: its own examples do not enter their normalization
        out = F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                           training=False, eps=self.eps)
        with torch.no_grad():
            mean, var = F.batch_stats(x)  # (N, C) -> (C,), (C,); biased
            n, m = x.shape[0], self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * var.to(self.running_var.dtype) * n / max(n - 1, 1))
            self.num_batches_tracked += 1
        return out


# GhostBatchNorm's virtual batch: every chunk of this many samples is normalized with its own
# statistics. 4, so that in the batch-size sweep ghost BN is plain BN at batches 2 and 4 (a check
# you can see in the plot) and from batch 8 on normalizes with the statistics of 4 samples while
# averaging the gradient over the whole batch: it separates the noise of small-batch statistics
# from the other effects of a small batch (more, noisier SGD steps per epoch).
GHOST_VIRTUAL_BATCH = 4

# BatchRenorm's clipping: r in [1/R_MAX, R_MAX], d in [-D_MAX, D_MAX]. Fixed at the values Ioffe
# (2017) ends his schedule with, from the first step; the paper instead starts at r_max=1, d_max=0
# (plain BN) and relaxes them over tens of thousands of steps, longer than these sweeps train.
RENORM_R_MAX = 3.0
RENORM_D_MAX = 5.0

# name -> (features -> layer) for fully connected nets. "none" is an identity, so the no-BN net is
# the same Sequential with the BN rows removed from the parameter list.
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda features: nn.Identity(),
    "bn": lambda features: batchnorm.BatchNorm1d(features),
    "bn-seed002": Seed002BatchNorm,  # seed 002's running-statistics rule, for comparison only
    "ghost": lambda features: LabGhostBatchNorm1d(features, virtual_batch_size=GHOST_VIRTUAL_BATCH),
    "renorm": lambda features: batchnorm.BatchRenorm1d(features, r_max=RENORM_R_MAX, d_max=RENORM_D_MAX),
    # the ghost sweep's GhostBN, whose virtual batch is the swept setting ("GhostBN @ 8": virtual batch
    # 8); the sweep builds it with ghost_layer(setting), this default only serves check_norm and alone use
    "ghost-v": lambda features: LabGhostBatchNorm1d(features, virtual_batch_size=GHOST_VIRTUAL_BATCH),
}

# how the plots and tables name a variant
LABELS = {
    "none": "NoBN", "bn": "BN", "bn-seed002": "BN, seed 002's running-stats rule",
    "ghost": f"GhostBN (virtual batch {GHOST_VIRTUAL_BATCH})", "renorm": "BatchRenorm", "ghost-v": "GhostBN",
    "faithful": "BN, seed 002 faithful (randn gamma/beta, test-batch statistics at 128)",
    "pytorch": "BN, PyTorch convention (gamma 1, beta 0, running statistics)",
    "bn-after": "BN after the activation",
    "none-sigmoid": "NoBN, sigmoid", "bn-sigmoid": "BN, sigmoid", "none-tanh": "NoBN, tanh", "bn-tanh": "BN, tanh",
    "bn-noisy": "BN + injected covariate shift",
    "dropout": "Dropout (no BN)", "bn+dropout": "BN + dropout", "bn-population": "BN, population statistics (noise-free)",
}


def label(norm: str) -> str:
    if norm.startswith("bn-m"):  # eval-sweep's BN at a momentum: "bn-m0.01"
        return f"BN momentum {norm[4:]}"
    return LABELS.get(norm, norm)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown normalization variant {norm!r}: choose from {', '.join(NORMS)}")


def circles_net(norm: str = "bn") -> nn.Module:
    """Seed 000's NetWithBN / NetWithoutBN: (N, 2) -> (N, 2) logits."""
    check_norm(norm)
    return nn.Sequential(
        nn.Linear(2, 64), NORMS[norm](64), nn.ReLU(),
        nn.Linear(64, 32), NORMS[norm](32), nn.ReLU(),
        nn.Linear(32, 2),
    )


def mnist_mlp(norm: str = "bn") -> nn.Module:
    """Seed 002's multi_network: (N, 1, 28, 28) -> (N, 10); BN is FunctionalBatchNorm(100)."""
    if norm not in ("bn", "none"):
        raise ValueError(f"the mlp experiment compares 'bn' (hand-written functional BN) and 'none', got {norm!r}")
    return nn.Sequential(
        nn.Flatten(),  # (N, 1, 28, 28) -> (N, 784)
        nn.Linear(784, 100),
        FunctionalBatchNorm(100) if norm == "bn" else nn.Identity(),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def mnist_cnn(norm: str = "bn") -> nn.Module:
    """Seed 002's conv_bn_net / conv_no_bn_net: (N, 1, 28, 28) -> (N, 10)."""
    if norm not in ("bn", "none"):
        raise ValueError(f"the cnn experiment compares 'bn' and 'none', got {norm!r}")
    bn = (lambda c: batchnorm.BatchNorm2d(c)) if norm == "bn" else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), bn(6), nn.ReLU(), nn.MaxPool2d(2, 2),  # -> (N, 6, 14, 14)
        nn.Conv2d(6, 16, 5), bn(16), nn.ReLU(), nn.MaxPool2d(2, 2),  # -> (N, 16, 5, 5)
        nn.Flatten(),  # (N, 16, 5, 5) -> (N, 400)
        nn.Linear(400, 10),
    )


def ghost_layer(virtual_batch: int) -> Callable[[int], nn.Module]:
    """features -> the lab's GhostBatchNorm1d with this virtual batch (the ghost sweep varies it)."""
    return lambda features: LabGhostBatchNorm1d(features, virtual_batch_size=virtual_batch)


def deep_mlp(depth: int, norm: str = "bn", width: int = 100, inputs: int = 784, classes: int = 10,
             layer: Callable[[int], nn.Module] | None = None, dropout: float = 0.0,
             activation: Callable[[], nn.Module] = nn.ReLU, norm_after_activation: bool = False) -> nn.Module:
    """`depth` hidden blocks Linear(width)-norm-ReLU, then Linear(classes): (N, *) -> (N, classes).

    With depth=1 and norm="bn" this is seed 002's MLP with the module BN instead of the functional one.
    `layer`, when given, makes the norm layers instead of NORMS[norm] (a setting NORMS does not fix,
    such as GhostBN's virtual batch; `norm` still names the variant). `dropout` > 0 puts an
    nn.Dropout(dropout) after every hidden ReLU.
    """
    check_norm(norm)
    if depth < 1:
        raise ValueError(f"depth must be at least 1 hidden layer (got {depth})")
    layers: list[nn.Module] = [nn.Flatten()]
    features = inputs
    for _ in range(depth):
        norm_layer, act = (layer or NORMS[norm])(width), activation()
        layers += [nn.Linear(features, width), *((act, norm_layer) if norm_after_activation else (norm_layer, act))]
        if dropout:
            layers.append(nn.Dropout(dropout))
        features = width
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)
