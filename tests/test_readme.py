"""The README's runnable Python examples (those on the bundled model, not on
a placeholder path) run as written and print something."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
RUNNABLE = [block for block in BLOCKS if "path/to" not in block]


def test_the_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 2  # infilling and streaming, at least


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"example{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(block, tmp_path):
    run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the example printed nothing"
