"""Reward names for the CLI and for Python: ``resolve_reward(spec, **options) -> Reward``.

A spec is one or more terms joined by "+", each optionally weighted ("0.1*diversity"):

- a registered name (``available_rewards()``), e.g. "chgnet-etot", "ehull", "diversity";
- "pkg.module:attr": a Reward class (instantiated with the options that fit its signature), a Reward
  instance, or a plain per-sample function (wrapped in ``FunctionReward``);
- the modifier "species", which is not a term: it turns on the species check in the penalty gate of
  every gated term ("chgnet-etot+species" is the paper's reward).

Options go to every term whose constructor takes a parameter of that name; "term.option" targets one
term (e.g. ``**{"diversity.method": "exact"}``). Penalty options (``penalty`` for all values at once, or
any ``PenaltyConfig`` field: ``parse_error``, ``overlap_rule``, ``check_species``, ...) become the
``penalties`` overrides of the gated terms, on top of each term's defaults. An option no term takes is an
error, so typos do not pass silently, except the context options ``data_dir``, ``cache_dir`` and ``device``,
which a caller (the CLI) may always pass and which are dropped when no term needs them.

Examples::

    resolve_reward("chgnet-etot+species")                 # paper: -E_tot, -0.1 penalties, species kept
    resolve_reward("ehull+0.1*diversity", batch_size=64)  # future work: -E_hull plus a diversity bonus
    resolve_reward("ehull+species+diversity", device="cuda")
    resolve_reward("mypkg.rewards:BandGapReward", target=1.5)
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import fields

from rewards.ase_calculator import SevenNetEnergyReward, UMAEnergyReward
from rewards.base import FunctionReward, Reward
from rewards.chgnet_energy import CHGNetEnergyReward
from rewards.composite import Composite
from rewards.diversity import DiversityReward, NoveltyReward
from rewards.ehull import EHullReward
from rewards.penalties import PenaltyConfig, PenaltyReward

MODIFIERS = {"species": "turns on the species-set check of the penalty gate (paper: ratios may change)"}
PENALTY_OPTIONS = {"penalty"} | {f.name for f in fields(PenaltyConfig)}
CONTEXT_OPTIONS = {"data_dir", "cache_dir", "device"}  # passed where taken, silently dropped elsewhere
_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)\s*\*\s*)?(?P<name>[^*\s]+)\s*$")


REGISTRY: dict[str, tuple[type, str]] = {
    "chgnet-etot": (
        CHGNetEnergyReward,
        "paper: -CHGNet energy per atom (eV/atom); batch_size, device, per_cell, relax_steps, volume_scan",
    ),
    "ehull": (
        EHullReward,
        "-min(E_hull, clip) (eV/atom; CHGNet on the MP-20 hull); clip, data_dir, cache_dir, relax_steps, "
        "volume_scan",
    ),
    "sevenn-etot": (
        SevenNetEnergyReward,
        "-SevenNet energy per atom (needs the sevenn extra); model, device",
    ),
    "uma-etot": (UMAEnergyReward, "-UMA energy per atom from a local checkpoint (uma extra); checkpoint"),
    "diversity": (DiversityReward, "-(share of the group duplicating this sample), in [-1, 0]; method"),
    "novelty": (NoveltyReward, "1 if no training structure of the formula matches, else 0; data_dir"),
    "validity": (PenaltyReward, "0 for a sample that passes the penalty gate, else its penalty"),
}


def available_rewards() -> dict[str, str]:
    """Registered names (and the "species" modifier) with a one-line description."""
    return {**{name: desc for name, (_, desc) in REGISTRY.items()}, **MODIFIERS}


def _parameters(target: Callable) -> set[str]:
    """Keyword parameters of a class's constructor or a function."""
    params = inspect.signature(target).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _import(path: str) -> object:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module!r} of reward {path!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no attribute {attr!r} (reward {path!r})")
        obj = getattr(obj, part)
    return obj


def _term(name: str) -> tuple[Callable[..., Reward], set[str]]:
    """Factory of a term and the option names it takes."""
    if name in REGISTRY:
        cls = REGISTRY[name][0]
        return cls, _parameters(cls)
    if ":" in name:
        obj = _import(name)
        if inspect.isclass(obj):
            return obj, _parameters(obj)
        if isinstance(obj, Reward):
            return (lambda: obj), set()
        if callable(obj):
            return (lambda: FunctionReward(obj, name=name)), set()
        raise ValueError(f"{name!r} is neither a Reward class, a Reward, nor a function")
    raise ValueError(
        f"unknown reward {name!r}; available: {sorted(available_rewards())} or 'pkg.module:attr'"
    )


def resolve_reward(spec: str, **options) -> Reward:
    """The reward for ``spec`` (see the module docstring); a single unweighted term is returned as is."""
    terms: list[tuple[float, str]] = []
    modifiers: set[str] = set()
    for part in spec.split("+"):
        match = _TERM.match(part)
        if match is None:
            raise ValueError(f"cannot parse reward term {part!r} in {spec!r} (expected [weight*]name)")
        name = match["name"]
        if name in MODIFIERS:
            modifiers.add(name)
        else:
            terms.append((float(match["weight"] or 1.0), name))
    if not terms:
        raise ValueError(f"reward spec {spec!r} has no reward term")

    penalty_overrides = {k: options.pop(k) for k in list(options) if k in PENALTY_OPTIONS}
    if "species" in modifiers:
        penalty_overrides["check_species"] = True
    used: set[str] = set()
    built: list[tuple[float, Reward]] = []
    for weight, name in terms:
        factory, params = _term(name)
        kwargs = {k: v for k, v in options.items() if "." not in k and k in params}
        prefix = f"{name}."
        kwargs |= {k[len(prefix) :]: v for k, v in options.items() if k.startswith(prefix)}
        if penalty_overrides and "penalties" in params:
            kwargs["penalties"] = {**kwargs.get("penalties", {}), **penalty_overrides}
            used.add("penalties")
        used |= {k for k in options if k in kwargs or k.startswith(prefix)}
        built.append((weight, factory(**kwargs)))
    unused = set(options) - used - CONTEXT_OPTIONS
    if unused:
        raise TypeError(f"options {sorted(unused)} are not taken by any term of {spec!r}")
    if penalty_overrides and "penalties" not in used:
        raise TypeError(
            f"penalty options/modifiers {sorted(penalty_overrides)} need a gated term in {spec!r}"
        )
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return Composite(built)
