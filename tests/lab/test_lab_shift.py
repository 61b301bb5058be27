"""`batchnorm run shift`: the corruptions, the flags it refuses, and the numbers it records."""
from __future__ import annotations

import json

import pytest
import torch

from batchnorm.lab.cli import main
from batchnorm.lab.experiments.shift import CONTRAST, CORRUPTIONS, NOISE_STD, corrupt


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 4:24] = torch.rand(n, 1, 20, 20, generator=g)  # a digit-like blob on a black frame
    return x * 2 - 1  # the lab's [-1, 1]


def test_contrast_scales_each_images_deviations_from_its_mean():
    x = _images()
    for severity in (1, 5):
        out = (corrupt(x, "contrast", severity, torch.Generator()) + 1) / 2
        image = (x + 1) / 2
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(out - mean, (image - mean) * CONTRAST[severity - 1])


def test_noise_is_seeded_clipped_and_grows_with_severity():
    x = _images()
    a = corrupt(x, "noise", 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, corrupt(x, "noise", 3, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, corrupt(x, "noise", 3, torch.Generator().manual_seed(8)))
    assert a.min() >= -1 and a.max() <= 1
    inside = x > -1  # away from the clipped black frame, the noise's std is the severity's
    diffs = [((corrupt(x, "noise", s, torch.Generator().manual_seed(0)) - x) / 2)[inside & (x < 0.5)].std() for s in (1, 3)]
    assert diffs[0] < diffs[1]
    assert abs(float(diffs[0]) - NOISE_STD[0]) < 0.03


def test_blur_keeps_the_mass_and_lowers_the_variance():
    x = _images()
    image = (x + 1) / 2
    mild = (corrupt(x, "blur", 1, torch.Generator()) + 1) / 2  # sigma 0.5: nothing leaks past the 4-pixel frame
    torch.testing.assert_close(mild.sum(dim=(1, 2, 3)), image.sum(dim=(1, 2, 3)), rtol=1e-4, atol=0)
    previous = image.var()
    for severity in (1, 3, 5):
        out = (corrupt(x, "blur", severity, torch.Generator()) + 1) / 2
        assert out.shape == x.shape and out.var() < previous
        previous = out.var()


def test_unknown_corruption():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(_images(), "fog", 1, torch.Generator())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grid", "0,1"], "severities are whole numbers from 1 to 5 (got 0)"),
        (["--grid", "6"], "severities are whole numbers from 1 to 5 (got 6)"),
        (["--grid", "2.5"], "severities are whole numbers from 1 to 5 (got 2.5)"),
        (["--variants", "none"], "variant 'none' has none"),
        (["--variants", "groupnorm"], "unknown normalization variant 'groupnorm'"),
    ],
    ids=["zero", "six", "fraction", "no-bn", "unknown-variant"],
)
def test_bad_flags_write_nothing(tmp_path, flags, message, capsys):
    out = tmp_path / "out"
    try:
        code = main(["run", "shift", *flags, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_run_records_every_condition_and_method_and_judges_five_claims(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "shift", "--seeds", "2", "--epochs", "2", "--limit", "150", "--grid", "2", "--out", str(out)]) == 0
    cell = json.loads((out / "cells" / "bn-seed0.json").read_text())
    accuracy = cell["extras"]["accuracy"]
    assert set(accuracy) == {"clean", *(f"{c}-2" for c in CORRUPTIONS)}
    for methods in accuracy.values():
        assert set(methods) == {"source", "stats", "target", "tent", "batch"}
        assert all(0 <= v <= 1 for v in methods.values())
    summary = json.loads((out / "summary.json").read_text())
    claims = summary["claims"]
    assert len(claims) == 5
    # two seeds: below the rules' five, so every verdict is inconclusive whatever the interval
    assert all(c["verdict"] == "inconclusive" and "rule asks for 5" in c["reason"] for c in claims)
