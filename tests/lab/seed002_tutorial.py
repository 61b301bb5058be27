"""Seed 002's hand-written batch norm, as the tutorial prints it: the oracle the lab's faithful
seed 002 layers are tested against (test_lab_seed002.py, test_lab_train.py)."""
import torch


def tutorial_batch_norm_1d(x, gamma, beta, is_training, moving_mean, moving_var, moving_momentum=0.1):
    """Seed 002's batch_norm_1d, as printed in the tutorial (the oracle for the faithful variant)."""
    eps = 1e-5
    x_mean = torch.mean(x, dim=0, keepdim=True)
    x_var = torch.mean((x - x_mean) ** 2, dim=0, keepdim=True)
    if is_training:
        x_hat = (x - x_mean) / torch.sqrt(x_var + eps)
        moving_mean[:] = moving_momentum * moving_mean + (1. - moving_momentum) * x_mean
        moving_var[:] = moving_momentum * moving_var + (1. - moving_momentum) * x_var
    else:
        x_hat = (x - moving_mean) / torch.sqrt(moving_var + eps)
    return gamma.view_as(x_mean) * x_hat + beta.view_as(x_mean)
