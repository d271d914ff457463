"""Optimizer, learning-rate schedule and data order shared by SFT and GRPO."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np
import torch

from grpo.precision import check_master_weights

LRSchedule = Literal["constant", "cosine"]  # after the warmup; the SFT and GRPO configs' field type


def build_adamw(
    model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed). Its moments take the
    parameters' dtype, so the weights must be float32 masters at a fine-tuning lr (PrecisionError otherwise,
    see grpo.precision)."""
    check_master_weights(model, lr)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_lambda(
    *, warmup_steps: int, total_steps: int, schedule: LRSchedule, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the peak learning rate: linear warmup, then constant or cosine decay to `min_lr_ratio`."""
    if schedule not in get_args(LRSchedule):
        raise ValueError(f"unknown lr schedule {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a config with warmup_steps, total_steps, lr_schedule and min_lr_ratio (SFT and GRPO)."""
    factor = lr_lambda(
        warmup_steps=config.warmup_steps,
        total_steps=config.total_steps,
        schedule=config.lr_schedule,
        min_lr_ratio=config.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class IndexSampler:
    """Endless seeded shuffles of range(n); (epoch, offset) is the whole state, so a resumed run sees the same order.

    With ``lengths``, each shuffle is length-grouped: cut into chunks of ``group`` indices, each chunk sorted by
    length. Consecutive batches (``group`` a multiple of the batch size) then hold items of similar length and
    little padding, while every item is still seen once per epoch in a seeded random chunk order.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int = 0,
        offset: int = 0,
        *,
        lengths: Sequence[int] | None = None,
        group: int = 0,
    ):
        if n < 1:
            raise ValueError("nothing to sample from: the dataset is empty")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} items")
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self.lengths = None if lengths is None or group < 2 else np.asarray(lengths)
        self.group = group

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's visiting order (a pure function of seed and epoch)."""
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        if self.lengths is None:
            return order
        chunks = [order[i : i + self.group] for i in range(0, self.n, self.group)]
        # stable sort: equal lengths keep their random order
        return np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])

    def take(self, count: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < count:
            order = self.order(self.epoch)
            chunk = order[self.offset : self.offset + count - len(picked)].tolist()
            picked.extend(chunk)
            self.offset += len(chunk)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
