"""`import batchnorm` stays light: torch and numpy only; Numba is loaded when a kernel first runs,
matplotlib / scikit-learn / tqdm only inside the lab, torch._dynamo (~1 s) only when compiling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = {"numba", "matplotlib", "sklearn", "tqdm", "scipy", "pandas"}
HEAVY_TORCH = {"torch._dynamo", "torch._inductor"}

# One fresh interpreter: what torch + numpy load by themselves (torch.hub imports tqdm when it is
# installed), what `import batchnorm` and its submodules add, and, to show the check can see an
# import, what a deliberate `import numba` adds.
PROBE = """
import json, sys
snapshot = lambda: set(sys.modules)
import torch, numpy
baseline = snapshot()
import batchnorm, batchnorm.functional, batchnorm.tools, batchnorm.kernels, batchnorm.autograd, batchnorm.modules
after = snapshot()
import numba
print(json.dumps({"file": batchnorm.__file__, "baseline": sorted(baseline), "added": sorted(after - baseline),
                  "numba_added": sorted(snapshot() - after)}))
"""


def test_import_adds_no_heavy_dependency():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(SRC)  # this worktree's package was imported
    added_heavy = sorted(m for m in report["added"] if m.split(".")[0] in HEAVY)
    assert added_heavy == [], added_heavy
    added_heavy_torch = sorted(m for m in report["added"] if ".".join(m.split(".")[:2]) in HEAVY_TORCH)
    assert added_heavy_torch == [], added_heavy_torch[:5]
    for name in ("numba", "matplotlib", "sklearn"):
        assert name not in report["baseline"] and name not in report["added"]
    assert "numba" in report["numba_added"]  # the check does see a heavy import
