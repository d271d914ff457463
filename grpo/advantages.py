"""Group-relative advantages (GRPO, paper eq. 2), computed from one scalar reward per sampled response.

Rewards arrive prompt-major: the ``group_size`` responses of prompt 0, then those of prompt 1, and so on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch


def _centre(x: torch.Tensor) -> torch.Tensor:
    """x - mean(x) along the last dim, exactly 0 where all values along that dim are equal.

    The explicit test matters: the float mean of n equal values is not always that value (three copies of 0.1
    sum to 0.30000000000000004), and the resulting 1e-17 residues divided by an equally tiny std give +-1.
    """
    all_equal = x.amax(dim=-1, keepdim=True) == x.amin(dim=-1, keepdim=True)
    return torch.where(all_equal, 0.0, x - x.mean(dim=-1, keepdim=True))


def _population_std(x: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt(1/n * sum_j (x_j - mean)^2) along the last dim (the 1/n of eq. 2, not Bessel's 1/(n-1))."""
    return _centre(x).square().mean(dim=-1, keepdim=True).sqrt()


def _divide_by_std(centred: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    # std == 0 only where every centred value is already exactly 0; the where keeps eps=0 from making 0/0.
    return torch.where(std > 0, centred / (std + eps), 0.0)


# Advantage scalings: each maps the rewards [groups, group_size] (float64) to advantages. With g(i) the group of
# response i, mu_g its mean and sigma_g its population std (paper eq. 2):


def _group_scale(groups: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (R_i - mu_g(i)) / (sigma_g(i) + eps)"""
    return _divide_by_std(_centre(groups), _population_std(groups), eps)


def _batch_scale(groups: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (R_i - mu_g(i)) / (sigma_batch + eps), sigma_batch the population std of all rewards"""
    return _divide_by_std(_centre(groups), _population_std(groups.flatten()).view(1, 1), eps)


def _no_scale(groups: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = R_i - mu_g(i)  (Dr. GRPO: no std scaling)"""
    return _centre(groups)


ADVANTAGE_SCALINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "group": _group_scale,
    "batch": _batch_scale,
    "none": _no_scale,
}
AdvantageScale = Literal[tuple(ADVANTAGE_SCALINGS)]  # the config field's type


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantage of each response relative to the other responses to the same prompt, scaled by
    ``ADVANTAGE_SCALINGS[scale]`` (formulas above).

    A group whose rewards are all equal (e.g. every sample invalid and penalised -0.1) carries no signal and
    gets exactly 0, for any eps including 0; likewise every advantage is 0 when the whole batch is equal.

    Computed in float64 whatever the input dtype (a bf16 reward has 3 significant digits, too few for a mean
    and a std), returned in the input dtype, or the default float dtype for integer rewards. Rewards carry no
    gradient. Raises ValueError for a batch that is empty, not 1-D, not a multiple of group_size, or holds a
    non-finite reward: failed samples must be mapped to a penalty upstream, not to NaN.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scale not in ADVANTAGE_SCALINGS:
        raise ValueError(f"unknown scale {scale!r}; expected one of {tuple(ADVANTAGE_SCALINGS)}")
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}; "
            "rewards must hold whole groups, laid out prompt-major"
        )
    values = rewards.detach().to(torch.float64)
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel() > 0:
        i = int(bad[0])
        raise ValueError(
            f"rewards must be finite: {bad.numel()} non-finite value(s), first {values[i].item()} at index {i} "
            f"(group {i // group_size}); give failed samples a finite penalty reward instead"
        )

    advantages = ADVANTAGE_SCALINGS[scale](values.view(-1, group_size), eps)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return advantages.flatten().to(out_dtype)
