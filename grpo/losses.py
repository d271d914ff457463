"""GRPO losses as small pure tensor functions: clipped policy loss, KL penalty, token aggregation, and the
per-token quantities they need (log-probabilities, entropy, masked means).

Shapes: B sequences of T tokens; ``mask`` [B, T] is nonzero on tokens that count (response tokens) and zero on
padding and prompt. Masked positions may hold any garbage, NaN and inf included: every reduction selects with
``torch.where`` (a product ``x * mask`` would turn NaN * 0 into NaN), so padding never reaches a result or a
gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

# Log-ratios are clamped to +-20 before exp: exp(20) ~ 4.9e8 is finite in fp32 and bf16, and a ratio that far
# from 1 is clipped by the PPO objective (or capped by the KL clamp) anyway. Without it one stale token with
# exp(...) = inf turns the loss, and through inf * 0 in backward every gradient, into NaN.
LOG_RATIO_CLAMP = 20.0
# Per-token k3 KL is clamped to [-10, 10] (as in verl's low_var_kl) so a single outlier token cannot dominate.
KL_CLAMP = 10.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{mask} x / max(#mask, 1) over ``dim`` (all dims when None); 0 where nothing is valid.

    ``mask`` (nonzero = valid) broadcasts to x. Masked entries of x are never read, so they may be NaN/inf.
    """
    valid = (mask != 0).expand_as(x)
    total = torch.where(valid, x, 0.0)
    count = valid.sum() if dim is None else valid.sum(dim=dim)
    total = total.sum() if dim is None else total.sum(dim=dim)
    return total / count.clamp(min=1)


# Aggregations of a per-token loss x [B, T] to a scalar. m is the mask, S = {b : sum_t m_bt > 0} the sequences
# with at least one valid token (a fully masked row is padding, not a sequence), L = max_len. Each one is a mean
# over units, tokens or sequences: ``reduce`` divides a sum over units by ``normaliser``, the number of units.
# So reduce * normaliser is a plain sum over rows, which is how the trainer splits a batch into micro-batches
# whose gradients add up to the whole batch's.


@dataclass(frozen=True)
class Aggregation:
    reduce: Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]  # (x, valid, max_len) -> scalar
    normaliser: Callable[[torch.Tensor], torch.Tensor]  # mask -> the number of units reduce divides by


def _token_count(mask: torch.Tensor) -> torch.Tensor:
    """sum_bt m_bt"""
    return (mask != 0).sum()


def _sequence_count(mask: torch.Tensor) -> torch.Tensor:
    """|S|"""
    return (mask != 0).any(dim=-1).sum()


def _token_mean(x: torch.Tensor, valid: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """sum_bt m_bt x_bt / sum_bt m_bt"""
    return masked_mean(x, valid)


def _seq_mean_token_mean(x: torch.Tensor, valid: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """1/|S| sum_{b in S} (sum_t m_bt x_bt / sum_t m_bt)"""
    return masked_mean(masked_mean(x, valid, dim=-1), valid.any(dim=-1))


def _seq_mean_token_sum(x: torch.Tensor, valid: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """1/|S| sum_{b in S} sum_t m_bt x_bt"""
    return masked_mean(torch.where(valid, x, 0.0).sum(dim=-1), valid.any(dim=-1))


def _seq_mean_token_sum_norm(x: torch.Tensor, valid: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """1/|S| sum_{b in S} sum_t m_bt x_bt / L

    Dr. GRPO: a constant per-sequence normaliser, so long and short responses weigh the same per token.
    """
    if max_len is None or max_len < 1:
        raise ValueError(f"mode 'seq-mean-token-sum-norm' needs max_len >= 1, got {max_len!r}")
    return _seq_mean_token_sum(x, valid, max_len) / max_len


AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": Aggregation(_token_mean, _token_count),
    "seq-mean-token-mean": Aggregation(_seq_mean_token_mean, _sequence_count),
    "seq-mean-token-sum": Aggregation(_seq_mean_token_sum, _sequence_count),
    "seq-mean-token-sum-norm": Aggregation(_seq_mean_token_sum_norm, _sequence_count),
}
AGG_MODES: tuple[str, ...] = tuple(AGGREGATIONS)
AggMode = Literal[AGG_MODES]  # the config field's type: the registry's names, listed once above


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar with the aggregation ``AGGREGATIONS[mode]`` (formulas above).

    ``max_len`` is needed by "seq-mean-token-sum-norm" and ignored by the other modes. Every mode returns 0 when
    nothing is valid, still attached to the graph with a zero gradient, so a fully padded micro-batch can go
    through backward.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    if per_token.ndim != 2 or per_token.shape != mask.shape:
        raise ValueError(
            f"per_token and mask must both be [B, T], got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    return AGGREGATIONS[mode].reduce(per_token, mask != 0, max_len)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (paper eq. 1) with asymmetric clipping (clip-higher when clip_high > clip_low):

        r_t    = exp(clamp(logp_t - old_logp_t, -20, 20))
        loss_t = -w_t min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)
        loss   = aggregate(loss_t, mask, agg, max_len)

    w_t = ``token_weights`` [B, T] (constants, e.g. ``truncated_importance_weights``), 1 when None.

    ``advantages`` is one value per sequence [B] (broadcast over its tokens) or per token [B, T]. logprobs is
    [B, T] and carries the gradient; old_logprobs and advantages are treated as constants by the caller.
    Computed in at least float32, so the subtraction, exp and reduction add no bf16 rounding to that of the
    inputs (the loss is float32 for bf16/fp16 inputs). Masked tokens count as r = 1, A = 0: they add nothing and get a zero gradient even
    when they hold NaN.

    Metrics (detached 0-dim tensors, token means over valid tokens; 0 when none is valid):
        clip_fraction: share of tokens where the clipped branch is active (its loss is strictly larger),
                       i.e. tokens that get no gradient;
        approx_kl:     k3 estimate of KL(pi_old || pi), mean of r - 1 - log r (unbiased, never negative);
        ratio_mean, ratio_max: of r over valid tokens.
    """
    if not 0.0 <= clip_low <= 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if logprobs.ndim != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be [B, T], got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    valid = mask != 0
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.to(dtype), 0.0)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * torch.where(valid, token_weights.to(dtype), 1.0)
    loss = aggregate(per_token, valid, agg, max_len)

    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).to(dtype), valid),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            # every ratio is > 0, so a 0 fill leaves the max of the valid ones as is (and gives 0 for none)
            "ratio_max": torch.where(valid, ratio, 0.0).amax(),
        }
    return loss, metrics


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025) for rollouts drawn by another engine (vLLM) whose
    numerics differ from the trainer's: per token

        w_t = min(exp(clamp(logp_trainer_t - logp_sampler_t, -20, 20)), cap)

    the trainer's probability of the sampled token (under the weights that sampled it) over the sampler's,
    capped so a token the sampler rated far too low cannot blow up the gradient. A constant (no gradient) that
    multiplies the per-token policy loss (``policy_loss(token_weights=...)``); float32 at least.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    dtype = torch.promote_types(trainer_logprobs.dtype, torch.float32)
    diff = trainer_logprobs.detach().to(dtype) - sampler_logprobs.detach().to(dtype)
    return torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)


# Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3), each a function of
# d = ref - logp.


def _k1(d: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref = -d: unbiased, high variance, can be negative."""
    return -d


def _k2(d: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (logp - ref)^2: biased, low variance."""
    return 0.5 * d.square()


def _k3(d: torch.Tensor) -> torch.Tensor:
    """k3 = clamp(exp(d) - d - 1, -10, 10): unbiased, low variance, >= 0 (verl's "low_var_kl").

    d is first clamped to [-20, 20] so exp(d) stays finite (inf would make the backward pass NaN even where the
    outer clamp zeroes the gradient).
    """
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}
KLKind = Literal[tuple(KL_ESTIMATORS)]  # the config field's type


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) with the estimator ``KL_ESTIMATORS[kind]`` (formulas above).

    The caller aggregates (e.g. ``aggregate``) and adds kl_coef * KL to the loss (paper: 0.001), not to the
    reward. Computed in at least float32. Entries must be finite everywhere, padding included (or masked to
    equal values beforehand): a NaN at a padded token would give a NaN gradient there.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {tuple(KL_ESTIMATORS)}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    return KL_ESTIMATORS[kind](ref_logprobs.to(dtype) - logprobs.to(dtype))


def _rowwise_fp32(
    fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """fn (a reduction over the vocabulary, [N, V] -> [N]) applied in at least float32.

    bf16/fp16 logits are upcast chunk by chunk under activation checkpointing, so neither the forward nor the
    saved-for-backward state ever holds a float32 copy of the whole [..., V] tensor, only of one chunk.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return fn(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [
        checkpoint(lambda chunk: fn(chunk.float()), chunk, use_reentrant=False)
        for chunk in flat.split(chunk_rows)
    ]
    return torch.cat(parts).view(logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """log p(labels) = z[label] - logsumexp(z), for logits z [..., V] and integer labels [...].

    logits[..., t, :] must already score labels[..., t] (shift by one for a causal LM, divide by the sampling
    temperature first if the log-probs are to match the sampler). Equal to log_softmax(z).gather(label) but
    never builds (or saves for backward) the [..., V] log-softmax. Float32 for bf16/fp16 logits.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lse = _rowwise_fp32(lambda z: torch.logsumexp(z, dim=-1), logits, chunk_rows)
    return picked.to(lse.dtype) - lse


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim, in the stable logsumexp form (no log of a tiny probability):

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,   p = softmax(z)

    Logits must be finite. Shape [...]; float32 for bf16/fp16 logits.
    """
    return _rowwise_fp32(
        lambda z: torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1), logits, chunk_rows
    )
