"""The README's Python API example (examples/quickstart.py) runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_as_written(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", done.stdout).group(1))
    assert accuracy > 0.8, done.stdout
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from quickstart import MyModel
    finally:
        sys.path.remove(str(ROOT / "examples"))
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(saved) == list(MyModel().state_dict())


def test_readme_api_example_is_the_quickstart() -> None:
    """Every line of the README's API example appears in examples/quickstart.py."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    source = (ROOT / "examples" / "quickstart.py").read_text()
    for line in block.strip().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            assert line.strip() in source, line
