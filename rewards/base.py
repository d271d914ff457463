"""The reward interface: a batch of samples in, one finite float and one info dict per sample out.

A *sample* (``crystals.sample.Sample``) is one completion for one prompt. A *reward* maps a batch of
samples to ``RewardOutput(rewards, infos)``. Batching is the default because potentials are fastest on
batches; a plain per-sample function is adapted by ``FunctionReward``.

``CrystalTextReward`` is what the GRPO trainer calls with ``(metas, texts)``. It parses every text and
guarantees the contract the trainer relies on, whatever the wrapped reward does:

- one reward and one info dict per text, in order;
- every reward finite: a NaN/inf reward, or an exception raised by the reward, becomes the failure
  penalty for that sample (the batch is retried one sample at a time to find which one raised);
- every info has ``reward``, ``penalty`` (reason string or None), ``parse_s`` and ``reward_s`` (seconds);
- penalty reasons are counted in ``CrystalTextReward.counts`` and failures are logged.

``score_samples(samples)`` applies the same contract to samples built elsewhere (CIF files, evaluation).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from crystals.sample import Sample

log = logging.getLogger(__name__)

# The paper's penalty (-0.1) for an unusable generation; rewards may expose their own `failure_penalty`.
DEFAULT_FAILURE_PENALTY = -0.1


@dataclass
class RewardOutput:
    rewards: list[float]
    infos: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.infos:
            self.infos = [{} for _ in self.rewards]
        if len(self.infos) != len(self.rewards):
            raise ValueError(f"{len(self.rewards)} rewards but {len(self.infos)} infos")


@runtime_checkable
class Reward(Protocol):
    """Anything with a ``name`` that maps a batch of samples to a RewardOutput of the same length."""

    name: str

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput: ...


class FunctionReward:
    """Adapts ``fn(sample) -> float`` or ``fn(sample) -> (float, info_dict)`` to the batched protocol."""

    def __init__(self, fn: Callable[[Sample], float | tuple[float, dict]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        rewards, infos = [], []
        for sample in samples:
            value = self.fn(sample)
            reward, info = value if isinstance(value, tuple) else (value, {})
            rewards.append(float(reward))
            infos.append(dict(info))
        return RewardOutput(rewards, infos)


class CrystalTextReward:
    """The ``RewardFn`` the GRPO trainer calls: ``(metas, texts) -> (rewards, infos)``.

    Each meta needs "formula"; "elements" (the prompt's element set) defaults to the formula's elements.
    ``failure_penalty`` (used when the reward raises or returns a non-finite value) defaults to the
    reward's own ``failure_penalty`` attribute, else -0.1.
    """

    def __init__(self, reward: Reward, max_atoms: int = 20, failure_penalty: float | None = None):
        self.reward = reward
        self.max_atoms = max_atoms
        if failure_penalty is None:
            failure_penalty = getattr(reward, "failure_penalty", DEFAULT_FAILURE_PENALTY)
        self.failure_penalty = float(failure_penalty)
        self.counts: Counter[str] = Counter()  # penalty reason -> number of samples, over all calls
        self.name = reward.name

    def samples(self, metas: Sequence[dict], texts: Sequence[str]) -> tuple[list[Sample], list[float]]:
        """Parsed samples and the seconds each parse took."""
        if len(metas) != len(texts):
            raise ValueError(f"{len(metas)} metas but {len(texts)} texts")
        samples, seconds = [], []
        for meta, text in zip(metas, texts, strict=True):
            if "formula" not in meta:
                raise KeyError(f"prompt metadata needs a 'formula' key, got keys {sorted(meta)}")
            elements = meta.get("elements")
            t0 = time.perf_counter()
            samples.append(
                Sample.from_text(
                    meta["formula"], text, self.max_atoms, None if elements is None else frozenset(elements)
                )
            )
            seconds.append(time.perf_counter() - t0)
        return samples, seconds

    def __call__(self, metas: Sequence[dict], texts: Sequence[str]) -> tuple[list[float], list[dict]]:
        samples, parse_seconds = self.samples(metas, texts)
        rewards, infos = self.score_samples(samples)
        for info, parse_s in zip(infos, parse_seconds, strict=True):
            info["parse_s"] = parse_s
        return rewards, infos

    def score_samples(self, samples: Sequence[Sample]) -> tuple[list[float], list[dict]]:
        """The contract on already-built samples: finite rewards, one info each, failures isolated."""
        t0 = time.perf_counter()
        pairs = self._score(list(samples))
        reward_s = (time.perf_counter() - t0) / max(len(samples), 1)
        rewards, infos = [], []
        for sample, (reward, info) in zip(samples, pairs, strict=True):
            info = {**info, "penalty": info.get("penalty"), "parse_s": 0.0, "reward_s": reward_s}
            if not math.isfinite(reward):
                log.warning(
                    "reward %s gave %r for %s; using the failure penalty", self.name, reward, sample.formula
                )
                info["penalty"], info["nonfinite_value"] = "nonfinite_reward", str(reward)
                reward = self.failure_penalty
            info["reward"] = reward
            if info["penalty"] is not None:
                self.counts[info["penalty"]] += 1
            rewards.append(reward)
            infos.append(info)
        return rewards, infos

    def _score(self, samples: list[Sample]) -> list[tuple[float, dict]]:
        """(reward, info) per sample; a batch that raises is retried one sample at a time so that only the
        sample that raises gets the failure penalty."""
        if not samples:
            return []
        try:
            out = self.reward(samples)
            if len(out.rewards) != len(samples):
                raise ValueError(f"reward returned {len(out.rewards)} values for {len(samples)} samples")
            return [(float(r), dict(i)) for r, i in zip(out.rewards, out.infos, strict=True)]
        except Exception as exc:
            if len(samples) > 1:
                log.warning(
                    "reward %s raised on a batch of %d (%r); retrying one by one",
                    self.name,
                    len(samples),
                    exc,
                )
                return [pair for sample in samples for pair in self._score([sample])]
            # grpo.trainer.REWARD_ERROR's prefix: the trainer stops a run whose every sample fails for a few steps
            reason = f"reward_error:{type(exc).__name__}"
            log.warning("reward %s raised on %s: %r", self.name, samples[0].formula, exc)
            return [(self.failure_penalty, {"penalty": reason, "error": str(exc)[:500]})]
