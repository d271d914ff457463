"""Diversity within a GRPO group and novelty against the training set (the paper's second future-work
item: keep exploring instead of collapsing onto one structure).

``DiversityReward``: samples are grouped by prompt formula (the GRPO group). For sample i in a group of G,

    d_i = -(number of other samples in the group that are the same crystal as i) / (G - 1)   in [-1, 0]

so all-distinct groups get 0 and a fully collapsed group gets -1 everywhere. "Same crystal" is pymatgen's
``StructureMatcher`` (default tolerances, as in the paper's match rate; structures with different reduced
formulas never match) or, with ``method="exact"``, an identical ``structure_key`` (same cell and sites up to
site order and 1e-4 rounding; much cheaper). Unparsed samples get 0 (they are already penalised).

``NoveltyReward``: 1 when no training structure with the same reduced formula matches the sample under
``StructureMatcher``, else 0 (unparsed samples: 0); ``crystals.matching.KnownStructures`` decides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystals.matching import KnownStructures, structure_key
from crystals.sample import Sample
from rewards.base import RewardOutput


class DiversityReward:
    name = "diversity"

    def __init__(self, method: Literal["matcher", "exact"] = "matcher"):
        if method not in ("matcher", "exact"):
            raise ValueError(f"method must be 'matcher' or 'exact', got {method!r}")
        self.method = method
        self.matcher = StructureMatcher()

    def _classes(self, structures: list[Structure]) -> list[int]:
        """An equivalence-class id per structure: each is compared with one representative per class."""
        keys = [structure_key(s) for s in structures]
        if self.method == "exact":
            ids: dict[tuple, int] = {}
            return [ids.setdefault(key, len(ids)) for key in keys]
        reps: list[int] = []  # index of each class's first member
        labels: list[int] = []
        for i, s in enumerate(structures):
            formula = s.composition.reduced_formula
            for label, r in enumerate(reps):
                rep = structures[r]
                if keys[i] == keys[r] or (
                    rep.composition.reduced_formula == formula and self.matcher.fit(s, rep)
                ):
                    labels.append(label)
                    break
            else:
                reps.append(i)
                labels.append(len(reps) - 1)
        return labels

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, sample in enumerate(samples):
            groups[sample.formula].append(i)
        rewards = [0.0] * len(samples)
        infos: list[dict] = [{"duplicates": 0} for _ in samples]
        for members in groups.values():
            parsed = [i for i in members if samples[i].structure is not None]
            if len(members) < 2 or len(parsed) < 2:
                continue
            labels = self._classes([samples[i].structure for i in parsed])
            for i, label in zip(parsed, labels, strict=True):
                duplicates = labels.count(label) - 1
                rewards[i] = -duplicates / (len(members) - 1)
                infos[i]["duplicates"] = duplicates
        return RewardOutput(rewards, infos)


class NoveltyReward:
    name = "novelty"

    def __init__(
        self, train_structures: Iterable[Structure] | None = None, data_dir: str | Path | None = None
    ):
        """Training structures given explicitly, or the "train" split of ``data_dir`` (CIFs parsed lazily)."""
        self.known = KnownStructures(train_structures, data_dir)

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        rewards, infos = [], []
        for sample in samples:
            novel = sample.structure is not None and self.known.is_novel(sample.structure)
            rewards.append(float(novel))
            infos.append({"novel": novel})
        return RewardOutput(rewards, infos)
