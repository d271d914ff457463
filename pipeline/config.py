"""Run configs of the crystal pipeline, TOML presets, and the run directory's resolved `config.toml`.

A config file has one table per config (`[run]`, `[sft]`, `[grpo]`, `[reward]`, `[generator]`, `[sample]`,
`[relax]`, `[evaluate]`); each command reads the tables it needs. The presets under `configs/` (the demo, its
quick variant, the paper's settings) are ordinary config files, read by the same loader as `--config`; a file
may start from another with a top-level `extends = "other.toml"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crystals.grammar import Constraint
from grpo.atomic import atomic_write_text
from grpo.config import ConfigError, check_fields, config_differences, load_sections, read_toml, to_toml
from grpo.models import CHATML_SPECIAL_TOKENS, Dtype
from grpo.precision import ComputeDtype

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


class PipelineError(Exception):
    """A problem the user can fix (bad option, missing data, a run directory of other settings): printed as
    one line, never a traceback."""


@dataclass
class RunConfig:
    """What a run is made of, besides the optimiser settings."""

    model: str = "tiny"  # path or hub name of a causal LM, or a size name (tiny/small/base) to build fresh
    data_dir: str | None = None
    # auto (CUDA when present), cpu, cuda, cuda:N; under torchrun each rank its local GPU (auto or cuda)
    device: str = "auto"
    # Storage of the trained model: its master weights and, following them, the optimizer's moments. bfloat16
    # masters do not train at a fine-tuning lr (an AdamW step rounds away) and are refused; for bf16 speed
    # keep float32 here and set compute_dtype.
    dtype: Dtype = "float32"
    # What the forward and backward passes compute in: "bfloat16" with float32 masters is mixed precision
    # (autocast in one process, FSDP2 MixedPrecisionPolicy when sharded); the reference model is stored in it.
    # "auto": bfloat16 where the device multiplies it natively (CUDA, AVX512-BF16 or AMX CPUs), else float32.
    compute_dtype: ComputeDtype = "float32"
    gradient_checkpointing: bool = False
    prompt_examples: Literal["paper", "train"] = "paper"
    train_limit: int | None = None  # cap on training structures read (SFT pairs, tokenizer corpus)
    tokenizer_vocab_size: int = 2048
    # Whole-number tokens (" 0.25" is one token) make sequences ~3x shorter than digit-by-digit spelling, which
    # is what makes CPU training affordable; the vocabulary is large enough to hold every coordinate.
    tokenizer_split_digits: bool = False
    # "line": the paper's one-line text. "lines": lattice, then one atom per line; the same tokens plus
    # newlines, which a small model learns to lay out much sooner (the parser reads both).
    structure_layout: Literal["line", "lines"] = "line"
    # What sampling may write (crystals.grammar), in GRPO and in `sample`: "none" (the paper: anything, invalid
    # text is penalised), "format" (valid crystal text), "elements" (only the prompt's elements, each at least
    # once) or "formula" (the prompt's exact composition). "formula" by default: every sample is then a crystal
    # of the asked composition, so every GRPO sample is scored on its energy and none is wasted on a penalty.
    constraint: Constraint = "formula"
    # > 0: under a grammar, sampling may not put an atom within this x (r_i + r_j) of an earlier one (covalent
    # radii; 0.5 is the validity rule, so no sample fails it while its cell has a free point for each atom;
    # crystals.separation). HF generator only; no effect with constraint "none" (the rule reads the text a
    # grammar keeps well formed).
    # 0: off, as in the paper (a small model's commonest failure is atoms on top of each other).
    separation: float = 0.0
    # > 0: under a grammar, sampling may not write a cell smaller than this x the covalent-sphere volume of its
    # atoms (0.9: roomier than 99.5 % of MP-20's crystals; crystals.cell_volume), so a cell leaves the
    # separation rule room for every atom. Same scope as separation. 0: off.
    volume_floor: float = 0.0
    # > 0: nor a cell whose a b c passes this many A^3 per atom (150: above every MP-20 test crystal's, at most
    # 134), where an atom may find no neighbour within the potential's cutoff and the reward fails. Same
    # scope. 0: off.
    volume_ceiling: float = 0.0
    max_atoms: int = 20  # atoms per cell at most (paper: 20): the grammar's limit and the reward's penalty
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, ">= 1", lambda v: v >= 1, "max_atoms", "train_limit")
        check_fields(self, ">= 0", lambda v: v >= 0, "separation", "volume_floor", "volume_ceiling")
        # the byte alphabet and the special tokens come first; train_bpe_tokenizer refuses less
        smallest = 256 + len(CHATML_SPECIAL_TOKENS)
        check_fields(self, f">= {smallest}", lambda v: v >= smallest, "tokenizer_vocab_size")


@dataclass
class RewardConfig:
    # The paper's reward: -E_tot (CHGNet, eV/atom) with -0.1 for invalid text, > run.max_atoms atoms or a changed
    # element set.
    name: str = "chgnet-etot+species"  # a registry name, a "+"-combination, or module:attr
    device: str = "cpu"
    # options of the reward's terms (rewards.registry.resolve_reward), e.g. `options = { clip = 5.0 }` or
    # `--set reward.options.ehull.clip=5`
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleConfig:
    """Sampling for evaluation: `samples_per_formula` structures for each of `num_formulas` formulas of a split."""

    split: Literal["train", "val", "test"] = "test"
    num_formulas: int = 20
    samples_per_formula: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, ">= 1", lambda v: v >= 1, "num_formulas", "samples_per_formula", "max_new_tokens")
        check_fields(self, ">= 0 (0: greedy)", lambda v: v >= 0, "temperature")


@dataclass
class EvaluateConfig:
    """How generated structures are judged (the relaxation itself is the `[relax]` table)."""

    relaxer: str = "chgnet"  # chgnet, sevenn or uma
    train_limit: int | None = None  # novelty against the first N training structures only (None: all)
    workers: int | None = None  # relaxation processes (None: one per core; 0: in this process)

    def __post_init__(self) -> None:
        check_fields(self, ">= 1 (unset: all)", lambda v: v >= 1, "train_limit")
        check_fields(self, ">= 0 (0: in this process)", lambda v: v >= 0, "workers")


def key_values(items: list[str], option: str) -> dict[str, str]:
    """{"KEY": "VALUE"} of `KEY=VALUE` strings (e.g. repeated --relaxer-option values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"{option} {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def preset_path(name: str) -> Path:
    """configs/NAME.toml of the repository."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise PipelineError(f"no preset {name!r} in {PRESETS_DIR}; known: {', '.join(known)}")
    return path


def load_configs(
    sections: dict[str, type], path: Path | None, overrides: list[str] | None, other_tables: bool = False
) -> dict:
    """The named config tables from a TOML file (or defaults) with `table.key=value` overrides. With
    `other_tables`, a file may hold tables the command does not read (a run's config.toml for `sample`)."""
    try:
        return load_sections(sections, path, overrides or [], other_tables=other_tables)
    except ConfigError as err:
        raise PipelineError(str(err)) from None


# Settings a resumed run may change: asking for more steps continues the same run (a cosine schedule is then
# stretched from the resumed step on).
LENGTHENING = frozenset({"total_steps"})


def check_run_dir(out: Path) -> None:
    """An output folder must be a folder (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} exists and is not a directory")


def refuse_changed_settings(run_dir: Path, configs: dict, resume: bool) -> None:
    """A run directory continues only the run that wrote it: resuming with other settings is refused, with the
    differing keys named (they would mix two experiments in one log and checkpoint series); only the run's
    length may change (LENGTHENING)."""
    check_run_dir(run_dir)
    saved_path = run_dir / "config.toml"
    if not (resume and saved_path.is_file()):
        return
    try:
        saved = read_toml(saved_path)
    except ConfigError as err:
        raise PipelineError(f"{run_dir} holds an unreadable config.toml ({err}); use a new --out") from None
    changed = [key for key in config_differences(saved, configs) if key.split(".", 1)[1] not in LENGTHENING]
    if changed:
        raise PipelineError(
            f"{run_dir} holds a run with different settings ({', '.join(changed)}); "
            "use a new --out, or --no-resume to start it over"
        )


def save_resolved_config(run_dir: Path, configs: dict) -> None:
    """RUN/config.toml: every setting of the run, written atomically (resume compares against it)."""
    atomic_write_text(run_dir / "config.toml", to_toml(configs))
