"""`import batchnorm` stays light: torch and numpy only; Numba is loaded when a kernel first runs,
matplotlib / scikit-learn / tqdm only inside the lab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ["numba", "matplotlib", "sklearn", "tqdm", "scipy", "pandas"]


def modules_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import batchnorm", id="import_batchnorm"),
        pytest.param("import batchnorm.functional, batchnorm.tools, batchnorm.kernels", id="import_submodules"),
    ],
)
def test_import_does_not_load_heavy_dependencies(code):
    """Nothing heavy beyond what `import torch, numpy` loads itself (torch.hub imports tqdm when it
    is installed, so tqdm is judged relative to that baseline); numba, matplotlib and scikit-learn
    are not loaded at all."""
    baseline = modules_after("import torch, numpy")
    loaded = modules_after(code)
    assert "batchnorm" in loaded and "torch" in loaded  # the subprocess imported what we think
    added = sorted(m for m in loaded - baseline if m.split(".")[0] in HEAVY)
    assert added == [], added
    for name in ("numba", "matplotlib", "sklearn"):
        assert name not in loaded


def test_the_subprocess_imports_this_worktrees_package():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", "import batchnorm; print(batchnorm.__file__)"], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert Path(out.stdout.strip()).resolve().is_relative_to(SRC)


def test_the_check_can_see_a_heavy_import():
    assert "numba" in modules_after("import batchnorm, numba")
