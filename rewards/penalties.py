"""The paper's penalties, used as a gate in front of every potential.

A sample is *clean* when it parsed, has at most ``max_atoms`` atoms, (optionally) uses exactly the prompt's
element set, and has no overlapping atoms. ``Penalties.check(sample)`` returns the first violated rule as
a reason string (None when clean); ``Penalties.value(reason)`` is the reward that replaces the energy term.

Why a gate and not an additive term: a potential evaluated on overlapping atoms, a 0-volume cell or a
wrong element set returns energies that mean nothing (often very negative), and RL exploits any such
hole. So only clean structures reach the potential; the rest get a fixed penalty.

Paper values (section 4): -0.1 for a parse error or more than 20 atoms. The species rule (section 5.1)
compares element *sets*: ratios may change, elements may not be added or dropped. Structural validity is
the paper's covalent rule d_ij > scale * (r_cov,i + r_cov,j) with scale 0.5, or CDVAE's d_ij > 0.5 A.

Reasons: "parse_error:<parser reason>", "too_many_atoms", "species_mismatch", "overlap", and
"failure:<what>" (reported by potential rewards when no energy could be computed, valued ``failure``).
``overlap_slope`` (off by default) grades the overlap penalty by how deep the closest pair sits inside the
rule's distance: reward shaping for a model whose samples mostly overlap. Clean samples score as before, and
every other penalty must stay at or below the deepest overlap (checked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

from crystals.sample import Sample
from crystals.validity import (
    check_atom_count,
    check_species,
    check_structure_cdvae,
    check_structure_covalent,
    closest_approach,
    covalent_thresholds,
)
from rewards.base import RewardOutput


@dataclass(frozen=True)
class PenaltyConfig:
    """Penalty values (rewards, so negative) and which rules are checked."""

    parse_error: float = -0.1
    too_many_atoms: float = -0.1
    species_mismatch: float = -0.1
    overlap: float = -0.1
    failure: float = -0.1  # the potential crashed, returned NaN, timed out, or the cell was unusable
    max_atoms: int = 20
    check_species: bool = False
    overlap_rule: Literal["covalent", "cdvae", "none"] = "covalent"
    covalent_scale: float = 0.5  # covalent rule: d_ij > scale * (r_i + r_j)
    min_distance: float = 0.5  # cdvae rule: d_ij > min_distance (A)
    # > 0: an overlap costs `overlap` minus up to this much more, in proportion to how far the closest pair sits
    # inside the rule's distance (0 at the threshold, all of it for coincident atoms). A group whose samples
    # all overlap then still ranks them, nearest to valid first (the flat paper penalty gives it no signal).
    overlap_slope: float = 0.0

    @classmethod
    def uniform(cls, value: float, **overrides) -> PenaltyConfig:
        """The same penalty for every reason (e.g. -1.0 for the E_hull reward)."""
        return cls(**{**dict.fromkeys(PENALTY_VALUES, value), **overrides})


PENALTY_VALUES = ("parse_error", "too_many_atoms", "species_mismatch", "overlap", "failure")


def make_penalties(
    given: Penalties | PenaltyConfig | Mapping | None, default: PenaltyConfig | None = None
) -> Penalties:
    """A ``Penalties`` from a ready object, a config, or a mapping of overrides on top of ``default``;
    the override "penalty" sets every value at once (e.g. {"penalty": -1.0, "check_species": True})."""
    if isinstance(given, Penalties):
        return given
    if isinstance(given, PenaltyConfig):
        return Penalties(given)
    config = default or PenaltyConfig()
    overrides = dict(given or {})
    if "penalty" in overrides:
        overrides = {**dict.fromkeys(PENALTY_VALUES, overrides.pop("penalty")), **overrides}
    unknown = set(overrides) - {f.name for f in fields(PenaltyConfig)}
    if unknown:
        raise TypeError(
            f"unknown penalty options {sorted(unknown)}; valid: {[f.name for f in fields(PenaltyConfig)]}"
        )
    return Penalties(replace(config, **overrides))


class Penalties:
    """The gate: ``check(sample) -> reason | None`` and ``value(reason) -> penalty``."""

    def __init__(self, config: PenaltyConfig | None = None):
        self.config = config or PenaltyConfig()
        cfg = self.config
        if cfg.overlap_rule not in ("covalent", "cdvae", "none"):
            raise ValueError(f"overlap_rule must be covalent, cdvae or none, got {cfg.overlap_rule!r}")
        deepest = cfg.overlap - cfg.overlap_slope
        above = [name for name in PENALTY_VALUES if name != "overlap" and getattr(cfg, name) > deepest]
        if cfg.overlap_slope and above:
            # RL finds such a hole at once: seen, a model that wrote cells too large for the potential (a
            # failure) once a failure paid more than an overlap
            raise ValueError(
                f"penalties {above} rank above the deepest graded overlap ({deepest:g}): with overlap_slope "
                f"set penalty <= overlap - overlap_slope (e.g. penalty={deepest:g}, overlap={cfg.overlap:g})"
            )

    def check(self, sample: Sample) -> str | None:
        """The first rule the sample breaks, cheapest first; None when it may go to a potential."""
        cfg = self.config
        if sample.structure is None:
            return (
                "too_many_atoms"
                if sample.parse_error == "too_many_atoms"
                else f"parse_error:{sample.parse_error}"
            )
        structure = sample.structure
        if not check_atom_count(structure, cfg.max_atoms):
            return "too_many_atoms"
        if cfg.check_species and not check_species(structure, sample.elements):
            return "species_mismatch"
        if cfg.overlap_rule == "covalent" and not check_structure_covalent(structure, cfg.covalent_scale):
            return "overlap"
        if cfg.overlap_rule == "cdvae" and not check_structure_cdvae(structure, cfg.min_distance):
            return "overlap"
        return None

    def value(self, reason: str, sample: Sample | None = None) -> float:
        """Penalty for a reason from ``check`` or a "failure:..." reason; an overlap is graded by how close
        the sample's closest pair comes (``overlap_slope``), which needs the sample."""
        cfg = self.config
        kind = reason.split(":", 1)[0]
        if kind == "failure":
            return cfg.failure
        if kind not in ("parse_error", "too_many_atoms", "species_mismatch", "overlap"):
            raise ValueError(f"unknown penalty reason {reason!r}")
        if kind == "overlap" and cfg.overlap_slope and sample is not None and sample.structure is not None:
            structure = sample.structure
            thresholds = (
                covalent_thresholds(structure, cfg.covalent_scale)
                if cfg.overlap_rule == "covalent"
                else cfg.min_distance
            )
            depth = 1.0 - min(1.0, max(0.0, closest_approach(structure, thresholds)))
            return cfg.overlap - cfg.overlap_slope * depth
        return getattr(cfg, kind)


class PenaltyReward:
    """The gate alone as a reward: 0 for a clean sample, the penalty otherwise (a validity term)."""

    name = "penalties"

    def __init__(self, penalties: Penalties | PenaltyConfig | Mapping | None = None):
        self.penalties = make_penalties(penalties)
        self.failure_penalty = self.penalties.config.failure

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        reasons = [self.penalties.check(sample) for sample in samples]
        rewards = [
            0.0 if r is None else self.penalties.value(r, s) for r, s in zip(reasons, samples, strict=True)
        ]
        return RewardOutput(rewards, [{"penalty": reason} for reason in reasons])
