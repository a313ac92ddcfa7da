"""Linear probing of tokenizer latents (MAE protocol: a non-affine BatchNorm in front of a linear classifier).

The latents ``(N, L, H)`` (or any ``(N, ...)``) are flattened to ``(N, L*H)``; the probe is
``BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C)``, trained with AdamW (cosine schedule,
mini-batches) or full-batch L-BFGS on the train split, and top-1 accuracy is reported on the held-out split.
Runs are deterministic given ``seed`` (a private generator drives initialisation and shuffling).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["LinearProbe", "linear_probe", "train_test_split"]

ArrayLike = Union[Tensor, np.ndarray]


class LinearProbe(nn.Module):
    """``BatchNorm1d(dim, affine=False) -> Linear(dim, num_classes)``; input ``(B, dim)``, output logits ``(B, C)``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


def train_test_split(num: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint index split ``(train_idx, test_idx)`` of ``range(num)``, deterministic given ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(num)
    num_test = max(1, int(round(num * test_fraction)))
    if num_test >= num:
        raise ValueError(f"cannot split {num} samples with test_fraction={test_fraction}")
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _flatten(latents: ArrayLike, name: str) -> Tensor:
    x = torch.as_tensor(latents).detach()
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, ...) with at least 2 dims, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).float().cpu()


def _labels(labels: ArrayLike, num: int, name: str) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu()
    if y.shape != (num,):
        raise ValueError(f"{name} must have shape ({num},), got {tuple(y.shape)}")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(f"{name} must hold integer class ids")
    y = y.long()
    if num and int(y.min()) < 0:
        raise ValueError(f"{name} has negative class ids")
    return y


@torch.no_grad()
def _accuracy(model: LinearProbe, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def linear_probe(
    train_latents: ArrayLike,
    train_labels: ArrayLike,
    test_latents: ArrayLike,
    test_labels: ArrayLike,
    num_classes: Optional[int] = None,
    optimizer: str = "adamw",
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a linear probe on flattened latents and return held-out top-1.

    train_latents ``(N_train, ...)``, test_latents ``(N_test, ...)`` (flattened to ``(N, D)``), labels integer
    ``(N,)``. ``optimizer``: ``"adamw"`` (mini-batches of ``batch_size``, cosine lr decay over ``epochs``) or
    ``"lbfgs"`` (full batch, ``epochs`` outer steps of up to 20 iterations). Returns ``top1`` and ``train_top1``
    as fractions in [0, 1] (x100 for the paper's percent), ``num_train``, ``num_test``, ``dim``, ``num_classes``.
    """
    x_train, x_test = _flatten(train_latents, "train_latents"), _flatten(test_latents, "test_latents")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test latents flatten to different dims: {x_train.shape[1]} vs {x_test.shape[1]}")
    y_train = _labels(train_labels, x_train.shape[0], "train_labels")
    y_test = _labels(test_labels, x_test.shape[0], "test_labels")
    if x_train.shape[0] < 2:
        raise ValueError("linear_probe needs at least 2 training samples")
    if num_classes is None:
        num_classes = int(max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)) + 1
    if int(y_train.max()) >= num_classes or (len(y_test) and int(y_test.max()) >= num_classes):
        raise ValueError(f"labels exceed num_classes={num_classes}")

    generator = torch.Generator().manual_seed(seed)
    dim = x_train.shape[1]
    model = LinearProbe(dim, num_classes)
    with torch.no_grad():  # MAE: trunc_normal(std=0.01) weights, zero bias
        model.head.weight.copy_((torch.randn(num_classes, dim, generator=generator) * 0.01).clamp_(-0.02, 0.02))
        model.head.bias.zero_()

    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        total = epochs * steps_per_epoch
        step = 0
        for _ in tqdm(range(epochs), desc="linear probe", disable=not progress):
            model.train()
            order = torch.randperm(x_train.shape[0], generator=generator)
            for i in range(0, x_train.shape[0], batch_size):
                idx = order[i : i + batch_size]
                if idx.numel() < 2:  # BatchNorm needs 2+ samples
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    elif optimizer == "lbfgs":
        # Full batch: the non-affine BatchNorm is the standardisation with the whole train split's statistics.
        with torch.no_grad():
            model.norm.running_mean.copy_(x_train.mean(0))
            model.norm.running_var.copy_(x_train.var(0, unbiased=True))
        opt = torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
        x_norm = model.norm.eval()(x_train).detach()

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model.head(x_norm), y_train)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * model.head.weight.pow(2).sum()
            loss.backward()
            return loss

        for _ in tqdm(range(epochs), desc="linear probe (lbfgs)", disable=not progress):
            opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'lbfgs', got {optimizer!r}")

    return {
        "top1": _accuracy(model, x_test, y_test),
        "train_top1": _accuracy(model, x_train, y_train),
        "num_train": int(x_train.shape[0]),
        "num_test": int(x_test.shape[0]),
        "dim": int(dim),
        "num_classes": int(num_classes),
    }
