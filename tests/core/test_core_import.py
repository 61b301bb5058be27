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


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module a source file imports, at any depth (function bodies too), absolute names."""
    import ast

    here = package.split(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_layers_never_import_the_tools_built_on_them():
    """Layers and kernels sit below batchnorm.tools: no module outside tools/ and the lab imports
    it, not even inside a function (sync.py's convert_sync_batchnorm once did: an import cycle).
    The package's __init__, which re-exports the tools, is the one exception."""
    root = SRC / "batchnorm"
    offenders = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[1:2] in (("tools",), ("lab",)) or path.name == "__init__.py" and len(parts) == 2:
            continue
        package = ".".join(parts[:-1])  # a module's package; an __init__'s own package
        if any(name == "batchnorm.tools" or name.startswith("batchnorm.tools.") for name in _imported_modules(path, package)):
            offenders.append(str(path.relative_to(SRC)))
    assert not offenders, f"modules below the tools that import them: {offenders}"
    assert len(list(root.rglob("*.py"))) > 20  # the scan saw the package


def test_convert_sync_batchnorm_is_the_library_conversion():
    """The hook sync.py leaves for the tools is filled: torch's classmethod spelling converts."""
    from torch import nn

    import batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), batchnorm.BatchNormAct2d(4, activation="relu"))
    synced = batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is batchnorm.SyncBatchNorm
    assert type(synced[2]) is nn.Sequential and type(synced[2][0]) is batchnorm.SyncBatchNorm
    assert isinstance(synced[2][1], nn.ReLU)
