"""The README's Python API example, runnable as it is: a small CNN on the handwritten digits
that ship with scikit-learn, trained as a 4-stage PipeOptim pipeline (one worker process per
stage), then evaluated and turned back into a plain module.

    python examples/quickstart.py [--epochs 3] [--executor processes|local]
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import pipeoptim


class MyModel(nn.Module):
    """Input ``[batch, 1, 8, 8]`` float32 images, output ``[batch, 10]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(F.max_pool2d(x, 2).flatten(1))))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1,797 8x8 images scaled to [0, 1]: 1,500 to train on, the rest to test."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def main(epochs: int = 3, executor: str = "auto") -> float:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    batch = 32
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=batch, shuffle=True
    )
    x, y = x_train[:batch], y_train[:batch]  # one mini-batch: the largest the pipeline takes

    model = MyModel()  # any nn.Module
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))

    pipe = pipeoptim.compile(
        model,
        optimizer,
        gpus=4,
        example_inputs=x,
        example_targets=y,
        loss_fn=F.cross_entropy,
        executor=executor,
    )
    print(pipe.plan.table())  # one row per stage
    for epoch in range(epochs):
        for inputs, targets in loader:  # the last mini-batch is smaller: that is fine
            loss = pipe.step(inputs, targets)  # returns at once: a future
            scheduler.step()  # the stages follow the optimizer's lr
        print(f"epoch {epoch + 1}: last loss {float(loss):.4f}")  # blocks until it is known
    pipe.flush()  # wait for the mini-batches in flight
    logits = pipe.predict(x_test)  # forward only, current weights, eval mode
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.4f}")
    torch.save(pipe.state_dict(), "w.pt")  # keys exactly like model.state_dict()
    trained = pipe.to_module()  # a MyModel with the trained weights
    assert torch.equal(trained(x_test).argmax(1), logits.argmax(1))
    pipe.close()  # or use `with pipeoptim.compile(...) as pipe:`
    return accuracy


if __name__ == "__main__":  # needed in a script: each stage's worker process imports it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--executor", default="auto", choices=["auto", "processes", "local"])
    args = parser.parse_args()
    main(args.epochs, args.executor)
