"""Image classification tasks: handwritten digits (scikit-learn) and Fashion-MNIST (IDX files)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeoptim.tasks.base import Task, accuracy_evaluator, full_batches, shuffled_batches

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class ConvNet(nn.Module):
    """A small CNN (three conv + BatchNorm blocks, two fully connected layers).

    Input ``[B, 1, H, W]`` with H, W divisible by 4; output ``[B, classes]`` logits.
    """

    def __init__(
        self,
        size: int,
        channels: tuple[int, int, int] = (16, 32, 64),
        hidden: int = 128,
        classes: int = 10,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = nn.Linear(c3 * (size // 4) ** 2, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


def _task(
    name: str, x_train, y_train, x_test, y_test, size: int, batch_size: int, seed: int, source: str
) -> Task:
    torch.manual_seed(seed)
    model = ConvNet(size)
    inputs = (x_train,)
    return Task(
        name=name,
        metric="accuracy",
        model=model,
        example_inputs=(x_train[:batch_size],),
        example_targets=y_train[:batch_size],
        loss_fn=F.cross_entropy,
        batches=shuffled_batches(inputs, y_train, batch_size, seed),
        evaluate=accuracy_evaluator((x_test,), y_test, batch_size),
        steps_per_epoch=full_batches(int(y_train.shape[0]), batch_size),
        info={
            "train_examples": int(y_train.shape[0]),
            "test_examples": int(y_test.shape[0]),
            "source": source,
        },
    )


def digits(
    batch_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    test_limit: int | None = None,
    validation: int | None = None,
) -> Task:
    """8x8 handwritten digits shipped with scikit-learn (1,797 images; 80/20 split, seed 0);
    ``validation``: see :func:`_splits`.

    Raises:
        ValueError: ``data_dir`` is given (the data ship with scikit-learn; it was ignored).
    """
    if data_dir is not None:
        raise ValueError(
            f"digits ships with scikit-learn and reads no data folder ({data_dir!r}): leave --data-dir "
            "out (it is for fashion-mnist, sst2 and multi30k)"
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_tr, y_tr, x_te, y_te = _splits(x_tr, y_tr, x_te, y_te, limit, test_limit, validation)
    return _task(
        "digits",
        x_tr,
        y_tr,
        x_te,
        y_te,
        8,
        batch_size,
        seed,
        "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
    )


def _splits(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    limit: int | None,
    test_limit: int | None,
    validation: int | None,
) -> tuple[torch.Tensor, ...]:
    """The first ``limit`` training examples and the first ``test_limit`` test ones; with
    ``validation``, the evaluation split is instead the ``validation`` training examples after
    the first ``limit`` (held out from training: a learning rate chosen on them leaves the test
    split unseen).

    Raises:
        ValueError: ``validation`` without ``limit``, or more than the examples after it.
    """
    if not validation:
        return x_tr[:limit], y_tr[:limit], x_te[:test_limit], y_te[:test_limit]
    if limit is None or limit + validation > len(y_tr):
        raise ValueError(
            f"a validation split of {validation} examples is held out after the first limit ({limit}) "
            f"of the {len(y_tr)} training examples: give a limit of at most {len(y_tr) - validation}"
        )
    return x_tr[:limit], y_tr[:limit], x_tr[limit : limit + validation], y_tr[limit : limit + validation]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {folder}: pass --data-dir with the Fashion-MNIST IDX files "
        "(Debian: apt install dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist)"
    )


def fashion_mnist(
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    test_limit: int | None = None,
    validation: int | None = None,
) -> Task:
    """Fashion-MNIST (Xiao et al. 2017) from IDX files: 60,000 train / 10,000 test 28x28 images;
    ``validation``: see :func:`_splits`.

    Raises:
        FileNotFoundError: the IDX files are not in ``data_dir``.
    """
    folder = Path(data_dir or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
        arrays[split] = ((x - 0.2860) / 0.3530, torch.tensor(labels, dtype=torch.int64))
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    x_tr, y_tr, x_te, y_te = _splits(x_tr, y_tr, x_te, y_te, limit, test_limit, validation)
    return _task("fashion-mnist", x_tr, y_tr, x_te, y_te, 28, batch_size, seed, f"IDX files in {folder}")
