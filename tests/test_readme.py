"""The README's Python examples run as written and print something: those on
the bundled model as they stand, those on a LLaDA checkpoint with the
bundled model (it has a chat template too) on the CPU in its place."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llada.train import default_model_path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
PLACEHOLDER = '"path/to/LLaDA-8B-Instruct"'


def runnable(block: str) -> str:
    return block.replace(PLACEHOLDER, repr(default_model_path())).replace('device="cuda"', 'device="cpu"')


def test_the_readme_has_examples_on_both_kinds_of_model():
    assert sum(PLACEHOLDER in block for block in BLOCKS) >= 2  # the text and the token-level API
    assert sum(PLACEHOLDER not in block for block in BLOCKS) >= 2  # infilling and streaming
    assert all("path/to" not in runnable(block) for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block, tmp_path):
    run = subprocess.run([sys.executable, "-c", runnable(block)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the example printed nothing"
