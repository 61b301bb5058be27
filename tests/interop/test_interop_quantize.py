"""Post-training quantization (torch.ao FX graph mode) of a model with the library's layers: the
documented path is `batchnorm.convert(model, to="torch")` first (torch's fusion patterns know
torch's classes), which must give a model torch quantizes end to end into quantized convolutions
with BN folded in, close to the float model."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm


def test_ptq_after_convert_ends_with_quantized_convolutions():
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qconfig_mapping

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), batchnorm.BatchNormAct2d(8, activation="relu"),
    )
    calibration = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        for x in calibration:  # running statistics that describe the data
            model(x)
    model.eval()
    x = calibration[0]
    expected = model(x)
    converted = batchnorm.convert(model, to="torch")
    assert all(not m.training for m in converted.modules()), "convert must keep the eval flag on every module"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's FX quantization is deprecated upstream
        prepared = quantize_fx.prepare_fx(converted, get_default_qconfig_mapping("x86"), (x,))
        for batch in calibration:
            prepared(batch)
        quantized = quantize_fx.convert_fx(prepared)
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert kinds.count("ConvReLU2d") == 2 and not any("BatchNorm" in k for k in kinds), kinds
    assert all(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") for m in quantized.modules() if type(m).__name__ == "ConvReLU2d")
    error = (quantized(x) - expected).abs().max() / expected.abs().max()
    assert error < 0.05, f"quantized model off by {float(error):.3f} of the output's range"
