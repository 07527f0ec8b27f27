"""Messages about the inputs a user passes to ``compile`` and ``step``: plain numbers and names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeoptim
from pipeoptim.errors import PipelineError, TraceError


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def compile_mlp(**kwargs) -> pipeoptim.Pipeline:
    model = Mlp()
    settings = {"example_inputs": torch.randn(8, 6), "loss_fn": F.cross_entropy, "method": "1f1b"}
    settings |= {"executor": "local", "profile_dir": None, **kwargs}
    return pipeoptim.compile(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, **settings)


def test_row_counts_in_step_errors_are_plain_numbers() -> None:
    with compile_mlp() as pipe:
        with pytest.raises(PipelineError) as err:
            pipe.step(torch.randn(16, 6), torch.zeros(16, dtype=torch.long))
        assert str(err.value).startswith("mini-batch of 16 is larger than the 8 the plan was made for")
    with compile_mlp(data_parallel=2, micro_batches=1) as pipe:
        with pytest.raises(PipelineError) as err:
            pipe.step(torch.randn(1, 6), torch.zeros(1, dtype=torch.long))
        assert str(err.value).startswith("a mini-batch of 1 rows cannot be split across 2 data-parallel")


def test_missing_example_inputs_is_a_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match=r"^example_inputs must be a tensor .* got NoneType"):
        compile_mlp(example_inputs=None)


@pytest.mark.parametrize("data_parallel", [1, "auto"])
def test_dict_nested_and_0d_example_inputs_are_told_how_to_fix_them(data_parallel) -> None:
    """A dict, a nested tuple or a 0-d tensor got "must be a tensor or a tuple of tensors" with
    no way out (helper-156); data_parallel="auto" checked them with a copy of its own."""
    x = torch.randn(8, 6)
    for given, message in (
        ({"x": x}, r"got dict: .*wrap the model in a module whose forward takes each tensor positionally"),
        ((x, (x, x)), r"input 1 is of type tuple: the stages exchange tensors only: wrap the model"),
        ((x, torch.tensor(2.0)), r"example input 1 is a 0-d tensor: every input needs a batch dimension"),
    ):
        with pytest.raises(ValueError, match=message):
            compile_mlp(example_inputs=given, data_parallel=data_parallel)


def test_an_unknown_leaf_module_is_answered_with_real_names() -> None:
    with pytest.raises(TraceError) as err:
        compile_mlp(leaf_modules=["nosuch"])
    message = str(err.value)
    assert "'nosuch' is not a submodule of Mlp" in message
    assert message.endswith("e.g. 'fc1', 'fc2', 'fc3'")
