"""Models defined where worker processes cannot import them: ``python -c``, ``python -``
(stdin) and IPython (the shell behind notebooks). The default executor spawns one worker per
stage; the model class and loss function live in ``__main__`` and reach the workers by value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch, torch.nn.functional as F
from torch import nn
import pipeoptim

class Net(nn.Module):  # defined in __main__
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 3)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

torch.manual_seed(0)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
with pipeoptim.compile(model, opt, 2, example_inputs=x, loss_fn=lambda o, t: F.cross_entropy(o, t),
                       executor="processes", profile_dir=PROFILES, timeout=120) as pipe:
    losses = [float(pipe.step(x, y)) for _ in range(3)]
    pipe.flush()
    reference = Net()
    reference.load_state_dict(pipe.state_dict())
print("LOSSES", losses, type(reference).__name__)
"""


def _run(args: list[str], tmp_path: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", ["python -c", "python -", "ipython"])
def test_a_model_defined_in_main_trains_with_worker_processes(tmp_path: Path, form: str) -> None:
    code = SCRIPT.replace("PROFILES", repr(str(tmp_path)))
    if form == "python -c":
        done = _run([sys.executable, "-c", code], tmp_path)
    elif form == "python -":
        done = _run([sys.executable, "-"], tmp_path, stdin=code)
    else:
        pytest.importorskip("IPython")
        # IPython's shell runs the code as a notebook kernel runs a cell: in a "__main__" module
        # that has neither a file nor a spec
        done = _run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(s for s in done.stdout.splitlines() if s.startswith("LOSSES"))
    losses = [float(v) for v in line.split("[")[1].split("]")[0].split(",")]
    assert len(losses) == 3 and all(0 < v < 5 for v in losses) and losses[-1] < losses[0]
    assert "Traceback" not in done.stderr


class _Handle:
    """Stands for a native handle: copied by reference, but it cannot be pickled."""

    def __deepcopy__(self, memo: dict) -> _Handle:
        return self

    def __reduce__(self):
        raise TypeError("cannot pickle '_Handle' object")


def test_an_unpicklable_model_is_named_with_the_fix() -> None:
    import torch
    import torch.nn.functional as F

    import pipeoptim
    from pipeoptim.errors import PipelineError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model.handle = _Handle()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        PipelineError, match=r"cannot be sent to the stage worker processes.*executor='local'"
    ):
        pipeoptim.compile(
            model, opt, 2, example_inputs=torch.randn(4, 4), loss_fn=F.cross_entropy, profile_dir=None
        )
