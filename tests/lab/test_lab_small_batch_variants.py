"""GhostBatchNorm and BatchRenorm in the lab: named variants of models.NORMS, in batch-sweep's defaults,
its summary, verdicts, figure and report."""
from __future__ import annotations

import json

import pytest
import torch

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.cli import main
from batchnorm.lab.experiments import get

# Batch 9 on 100 digits: batches of 9 (virtual batches 4, 4, 1 -> 4, 5) and a last one of 1 (dropped).
TINY = ["--seeds", "1", "--steps", "5", "--limit", "100", "--grid", "2,9", "--variants", "none,bn,ghost,renorm",
        "--tune-lr", "none", "--no-standardize", "--init", "default"]


def test_the_variants_are_the_library_layers_with_the_documented_settings():
    ghost, renorm = models.NORMS["ghost"](7), models.NORMS["renorm"](7)
    assert isinstance(ghost, batchnorm.GhostBatchNorm1d) and ghost.virtual_batch_size == models.GHOST_VIRTUAL_BATCH
    assert isinstance(renorm, batchnorm.BatchRenorm1d)
    assert (renorm.r_max, renorm.d_max) == (models.RENORM_R_MAX, models.RENORM_D_MAX) == (3.0, 5.0)
    assert get("batch-sweep").defaults["variants"] == ["none", "bn", "renorm"]


@pytest.mark.parametrize("n", [5, 9, 13])
def test_lab_ghost_joins_a_last_single_sample_to_the_chunk_before(n):
    # The library's layer refuses a one-sample last chunk; the lab's joins it to the one before:
    # exactly BN on the chunks [4, ..., 4, 5] (or one chunk of 5), outputs and running statistics.
    torch.manual_seed(n)
    x = torch.randn(n, 3, dtype=torch.float64)
    ghost = models.LabGhostBatchNorm1d(3, virtual_batch_size=4, dtype=torch.float64)
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 value per channel"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4)(x.float())
    cut = n - 5
    expected = torch.cat([bn(c) for c in [*x[:cut].split(4), x[cut:]] if len(c)])
    torch.testing.assert_close(ghost(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=0, atol=1e-12)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == (n - 1) // 4


def test_batch_sweep_shows_ghost_and_renorm_beside_bn(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "batch-sweep", *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ghost, renorm = models.label("ghost"), models.label("renorm")
    for name in ("NoBN", "BN", ghost, renorm):
        for batch in (2, 9):
            assert summary["variants"][f"{name} @ {batch}"]["final_test_accuracy"] is not None
    # at batch 2 (one virtual batch) GhostBN is BN: same numbers
    assert summary["variants"][f"{ghost} @ 2"]["final_train_loss"] == summary["variants"]["BN @ 2"]["final_train_loss"]
    claims = {c["claim"]: c for c in summary["claims"]}
    # GhostBN is never judged where it is BN (batch 2 <= its virtual batch 4): no "holds up better" verdict
    assert f"{ghost} holds up better than BN at small batches." not in claims
    assert f"{renorm} holds up better than BN at small batches." in claims
    few = next(c for k, c in claims.items() if k.startswith("Normalizing with the statistics of a few samples"))
    assert "9: " in few["evidence"] and "2: " not in few["evidence"]  # only batch 9 > 4 is compared
    html = (out / "report.html").read_text()
    assert ghost in html and renorm in html and "sweep.png" in [f["file"] for f in summary["figures"]]
