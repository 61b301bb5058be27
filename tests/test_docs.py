"""Every ```python block of the README and of docs/*.md runs, in a fresh namespace, and its
asserts hold. A block that needs a process group (it calls init_process_group, so it is meant for
torchrun) is left to tests/scale and tests/lab, which run real multi-process groups."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(page, code, id=f"{page.stem}-block{i}")
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S))
    if "init_process_group" not in code
]


def test_readme_has_examples():
    assert sum(1 for p in BLOCKS if p.values[0].name == "README.md") >= 5


@pytest.mark.parametrize("page, code", BLOCKS)
def test_doc_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, str(page), "exec"), {"__name__": "doc_example"})
