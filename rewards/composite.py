"""Weighted sums of rewards: reward_i = sum_k w_k * r_k(sample_i).

``Composite([(1.0, EHullReward()), (0.1, DiversityReward())])`` is -E_hull + 0.1 * diversity. Each term
sees the whole batch (group terms like diversity need it). The info of a sample merges the terms' infos
(first term wins on a key clash), adds ``components`` = {term name: unweighted term reward} and reports
the first term's penalty reason. Gated terms each apply their own penalty, so two gated terms on one
composite penalise a rejected sample twice (weighted).
"""

from __future__ import annotations

from collections.abc import Sequence

from crystals.sample import Sample
from rewards.base import Reward, RewardOutput


class Composite:
    def __init__(self, terms: Sequence[tuple[float, Reward]], name: str | None = None):
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        self.terms = [(float(weight), reward) for weight, reward in terms]
        names = [reward.name for _, reward in self.terms]
        # unique component names even when a reward appears twice
        self.term_names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.name = name or "+".join(
            n if w == 1 else f"{w:g}*{n}" for (w, _), n in zip(self.terms, self.term_names, strict=True)
        )
        # used by CrystalTextReward when the whole composite fails on a sample
        self.failure_penalty = sum(w * getattr(r, "failure_penalty", 0.0) for w, r in self.terms)

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        totals = [0.0] * len(samples)
        infos: list[dict] = [{"components": {}, "penalty": None} for _ in samples]
        for (weight, reward), term in zip(self.terms, self.term_names, strict=True):
            out = reward(samples)
            if len(out.rewards) != len(samples):
                raise ValueError(
                    f"term {term} returned {len(out.rewards)} rewards for {len(samples)} samples"
                )
            for i, (value, info) in enumerate(zip(out.rewards, out.infos, strict=True)):
                totals[i] += weight * value
                infos[i]["components"][term] = value
                if infos[i]["penalty"] is None:
                    infos[i]["penalty"] = info.get("penalty")
                for key, item in info.items():
                    infos[i].setdefault(key, item)
        return RewardOutput(totals, infos)
