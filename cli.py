"""`crystal-grpo`: the command line. This module only wires the packages together:
crystals (text, prompts, data) -> grpo (models, SFT, GRPO) with rewards (the reward callable) -> evaluation.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="GRPO fine-tuning of language models to write stable crystal structures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect an MP-20 style data directory.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder with {train,val,test}.csv.gz (or its parent); default: $CRYSTAL_GRPO_DATA, else the packaged demo subset."),
]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML config file (tables per config).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (repeatable).")]


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (no traceback for bad input)."""
    err_console.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code=1)


# --------------------------------------------------------------------------------------------------------------
# data and check
# --------------------------------------------------------------------------------------------------------------
@data_app.command("info")
def data_info(data_dir: DataDirOption = None) -> None:
    """Counts, element coverage and the atom-count histogram of a data directory."""
    from crystals.data import DataError, data_summary

    try:
        summary = data_summary(data_dir)
    except DataError as err:
        raise fail(str(err)) from None
    console.print(f"data directory: {summary['data_dir']}")
    table = Table("split", "file", "rows")
    for split, info in summary["splits"].items():
        table.add_row(split, Path(info["file"]).name, str(info["rows"]))
    console.print(table)
    console.print(f"{summary['n_elements']} elements: {' '.join(summary['elements'])}")
    histogram = Table("atoms per cell", "structures")
    for n_atoms, count in sorted(summary["nsites_histogram"].items(), key=lambda kv: int(kv[0])):
        histogram.add_row(str(n_atoms), str(count))
    console.print(histogram)


def read_structure_file(path: Path):
    """A structure from a CIF file or a bulk-text file."""
    from crystals.text import parse_structure, read_cif

    text = path.read_text()
    if path.suffix.lower() == ".cif" or "_cell_length_a" in text:
        return read_cif(text)
    return parse_structure(text)


@app.command()
def check(
    files: Annotated[list[Path], typer.Argument(help="Bulk-text (.txt) or CIF files.")],
    max_atoms: Annotated[int, typer.Option(help="Atom-count limit (paper: 20).")] = 20,
) -> None:
    """Parse structure files and print a validity table; exit 1 if any file is unreadable."""
    from crystals.text import ParseError
    from crystals.validity import (
        check_atom_count,
        check_composition_smact,
        check_structure_cdvae,
        check_structure_covalent,
    )

    table = Table("file", "formula", "atoms", "parse", "CDVAE 0.5 A", "covalent", "SMACT", f"<= {max_atoms} atoms")
    problems: list[str] = []
    for path in files:
        try:
            structure = read_structure_file(path)
        except OSError as err:
            problems.append(f"{path}: unreadable ({err.strerror or err})")
            continue
        except (ParseError, ValueError) as err:
            problems.append(f"{path}: not a structure ({err})")
            continue
        checks = [
            check_structure_cdvae(structure),
            check_structure_covalent(structure),
            check_composition_smact(structure.composition),
            check_atom_count(structure, max_atoms),
        ]
        cells = ["[green]ok[/green]" if c.ok else f"[red]{c.reason}[/red]" for c in checks]
        table.add_row(str(path), structure.composition.reduced_formula, str(len(structure)), "ok", *cells)
    if table.rows:
        console.print(table)
    for problem in problems:
        err_console.print(problem, soft_wrap=True)
    if problems:
        raise fail(f"{len(problems)} of {len(files)} file(s) could not be read as structures")


# --------------------------------------------------------------------------------------------------------------
# models, prompts and datasets (the crystal side of training)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """What a run is made of, besides the optimiser settings."""

    model: str = "tiny"  # path or hub name of a causal LM, or a size name (tiny/small/base) to build fresh
    data_dir: str | None = None
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    gradient_checkpointing: bool = False
    prompt_examples: Literal["paper", "train"] = "paper"
    train_limit: int | None = None  # cap on training structures read (SFT pairs, tokenizer corpus)
    tokenizer_vocab_size: int = 2048
    # Whole-number tokens (" 0.25" is one token) make sequences ~3x shorter than digit-by-digit spelling, which
    # is what makes CPU training affordable; the vocabulary is large enough to hold every coordinate.
    tokenizer_split_digits: bool = False
    seed: int = 0


def load_crystal_texts(split: str, data_dir, limit: int | None) -> list[tuple[str, str]]:
    """(reduced formula, bulk text) of each structure of a split."""
    from crystals.data import iter_split
    from crystals.text import format_structure

    return [(r.formula, format_structure(r.structure)) for r in iter_split(split, data_dir, limit=limit)]


def prompt_builder(run: RunConfig, train_texts: list[str] | None = None):
    from crystals.prompts import PromptBuilder

    if run.prompt_examples == "train":
        return PromptBuilder(examples="train", train_texts=train_texts or [], seed=run.seed)
    return PromptBuilder(examples="paper", seed=run.seed)


def initial_model_source(run: RunConfig, run_dir: Path, train_pairs: list[tuple[str, str]] | None = None) -> str:
    """Path or name of the run's starting model. A size name builds a fresh small Qwen2 with a BPE tokenizer
    trained on crystal text and the prompt, saved once under run_dir/initial_model (a resumed run reuses it)."""
    from grpo.models import MODEL_SIZES, build_small_model, save_model, train_bpe_tokenizer

    if run.model not in MODEL_SIZES or Path(run.model).exists():
        return run.model
    initial = run_dir / "initial_model"
    if not (initial / "config.json").exists():
        pairs = train_pairs if train_pairs is not None else load_crystal_texts("train", run.data_dir, run.train_limit)
        builder = prompt_builder(run, [t for _, t in pairs])
        corpus = [t for _, t in pairs] + [builder.build(f).user_text for f, _ in pairs[:500]]
        tokenizer = train_bpe_tokenizer(
            corpus, vocab_size=run.tokenizer_vocab_size, split_digits=run.tokenizer_split_digits
        )
        save_model(build_small_model(run.model, tokenizer, seed=run.seed), tokenizer, initial)
    return str(initial)


def load_policy(run: RunConfig, source: str, checkpoint: Path | None):
    """The policy to train: the newest checkpoint's weights when resuming, else the starting model."""
    from grpo.models import load_model_and_tokenizer

    path = checkpoint / "model" if checkpoint is not None else source
    return load_model_and_tokenizer(path, dtype=run.dtype, gradient_checkpointing=run.gradient_checkpointing)


def load_sections_or_fail(sections: dict, config: Path | None, overrides: list[str] | None) -> dict:
    from grpo.config import ConfigError, load_sections

    try:
        return load_sections(sections, config, overrides or [])
    except ConfigError as err:
        raise fail(str(err)) from None


def save_resolved_config(run_dir: Path, configs: dict) -> None:
    from grpo.config import to_toml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(configs))


def check_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} exists and is not a directory")


def apply_cli_overrides(run: RunConfig, **values) -> None:
    for key, value in values.items():
        if value is not None:
            setattr(run, key, str(value) if isinstance(value, Path) else value)


def latest_to_resume(out: Path, resume: bool):
    from grpo.checkpoint import latest_checkpoint

    return latest_checkpoint(out) if resume else None


# --------------------------------------------------------------------------------------------------------------
# sft / train / sample
# --------------------------------------------------------------------------------------------------------------
@app.command()
def sft(
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, logs, resolved config).")],
    model: Annotated[str | None, typer.Option(help="Model path/name, or a size name: tiny, small, base.")] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = True,
) -> None:
    """Supervised fine-tuning: prompt for a formula -> its ground-truth structure (MP-20 train), eval on val."""
    from crystals.data import DataError
    from grpo.sft import SFTConfig, SFTTrainer

    check_run_dir(out)
    configs = load_sections_or_fail({"run": RunConfig, "sft": SFTConfig}, config, set_)
    run, sft_config = configs["run"], configs["sft"]
    apply_cli_overrides(run, model=model, data_dir=data_dir)
    try:
        save_resolved_config(out, configs)
        checkpoint = latest_to_resume(out, resume)
        train_pairs = load_crystal_texts("train", run.data_dir, run.train_limit)
        policy, tokenizer = load_policy(run, initial_model_source(run, out, train_pairs), checkpoint)
        val_pairs = load_crystal_texts("val", run.data_dir, sft_config.eval_samples)
    except DataError as err:
        raise fail(str(err)) from None
    builder = prompt_builder(run, [t for _, t in train_pairs])
    to_pairs = lambda pairs: [(builder.build(f).to_text(tokenizer), t) for f, t in pairs]  # noqa: E731
    trainer = SFTTrainer(
        model=policy,
        tokenizer=tokenizer,
        train_pairs=to_pairs(train_pairs),
        eval_pairs=to_pairs(val_pairs),
        config=sft_config,
        run_dir=out,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
        console.print(f"resumed from {checkpoint} (step {trainer.step_count})")
    trainer.train()
    final = out / "final_model"
    from grpo.models import save_model

    save_model(policy, tokenizer, final)
    console.print(f"SFT done: {trainer.step_count} steps; model saved to {final}")


@dataclass
class RewardConfig:
    # The paper's reward: -E_tot (CHGNet, eV/atom) with -0.1 for invalid text, > 20 atoms or a changed element set.
    name: str = "chgnet-etot+species"  # a registry name, a "+"-combination, or module:attr
    max_atoms: int = 20
    device: str = "cpu"


def build_reward_fn(reward: RewardConfig, data_dir: str | Path | None):
    """The (metas, texts) -> (rewards, infos) callable; bad names or missing data end with a one-line error."""
    from crystals.data import DataError
    from rewards.base import CrystalTextReward
    from rewards.registry import resolve_reward

    try:
        resolved = resolve_reward(reward.name, data_dir=data_dir, device=reward.device)
    except (ValueError, KeyError, TypeError, ImportError, DataError) as err:
        raise fail(f"reward {reward.name!r}: {err}") from None
    return CrystalTextReward(resolved, max_atoms=reward.max_atoms)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, logs, resolved config).")],
    model: Annotated[str | None, typer.Option(help="Starting model: a path (e.g. an SFT run's final_model), hub name, or size name.")] = None,
    reward: Annotated[str | None, typer.Option(help="Reward: chgnet-etot, ehull, 'ehull+species+diversity', module:attr.")] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = True,
) -> None:
    """GRPO on prompts for the training split's formulas, rewarded by a crystal reward."""
    from crystals.data import DataError, split_formulas
    from grpo.generation import HFGenerator
    from grpo.trainer import GRPOConfig, GRPOTrainer, PromptItem

    check_run_dir(out)
    configs = load_sections_or_fail({"run": RunConfig, "grpo": GRPOConfig, "reward": RewardConfig}, config, set_)
    run, grpo_config, reward_config = configs["run"], configs["grpo"], configs["reward"]
    apply_cli_overrides(run, model=model, data_dir=data_dir)
    apply_cli_overrides(reward_config, name=reward)
    reward_fn = build_reward_fn(reward_config, run.data_dir)
    try:
        save_resolved_config(out, configs)
        checkpoint = latest_to_resume(out, resume)
        source = initial_model_source(run, out)
        policy, tokenizer = load_policy(run, source, checkpoint)
        formulas = split_formulas("train", run.data_dir, seed=run.seed, limit=run.train_limit)
        examples = [t for _, t in load_crystal_texts("train", run.data_dir, 200)] if run.prompt_examples == "train" else None
    except DataError as err:
        raise fail(str(err)) from None
    ref_model = None
    if grpo_config.kl_coef > 0:
        from grpo.models import load_model_and_tokenizer

        ref_model, _ = load_model_and_tokenizer(source, dtype=run.dtype)
        ref_model.requires_grad_(False)
    builder = prompt_builder(run, examples)
    prompts = []
    for formula in formulas:
        crystal_prompt = builder.build(formula)
        meta = {"formula": crystal_prompt.formula, "elements": sorted(crystal_prompt.elements)}
        prompts.append(PromptItem(crystal_prompt.to_text(tokenizer), meta))
    trainer = GRPOTrainer(
        model=policy,
        tokenizer=tokenizer,
        generator=HFGenerator(policy, tokenizer),
        prompts=prompts,
        reward_fn=reward_fn,
        config=grpo_config,
        run_dir=out,
        ref_model=ref_model,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
        console.print(f"resumed from {checkpoint} (step {trainer.step_count})")
    trainer.train()
    from grpo.models import save_model

    save_model(policy, tokenizer, out / "final_model")
    console.print(f"GRPO done: {trainer.step_count} steps; model saved to {out / 'final_model'}")


def generate_samples(
    policy,
    tokenizer,
    formulas: list[str],
    *,
    samples_per_formula: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    builder,
    batch_size: int = 64,
) -> list[dict]:
    """Sample structures for formulas: one JSON-ready record per sample (formula, text, parse status, CIF)."""
    from crystals.text import ParseError, parse_structure, write_cif
    from grpo.generation import HFGenerator, SamplingConfig, decode_responses

    generator = HFGenerator(policy, tokenizer, batch_size=batch_size)
    records = []
    per_call = max(1, batch_size // samples_per_formula)
    for start in range(0, len(formulas), per_call):
        chunk = formulas[start : start + per_call]
        prompts = [builder.build(f) for f in chunk]
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + start)
        rollout = generator.generate([p.to_text(tokenizer) for p in prompts], samples_per_formula, sampling)
        texts = decode_responses(tokenizer, rollout)
        for i, text in enumerate(texts):
            prompt = prompts[i // samples_per_formula]
            record = {"id": f"{prompt.formula}-{start + i // samples_per_formula}-{i % samples_per_formula}", "formula": prompt.formula, "text": text}
            try:
                structure = parse_structure(text)
                record |= {"parse": "ok", "cif": write_cif(structure)}
            except ParseError as err:
                record |= {"parse": err.reason, "cif": None}
            records.append(record)
    return records


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Model path (e.g. a run's final_model) or hub name.")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write.")],
    split: Annotated[str, typer.Option(help="Split whose formulas are prompted.")] = "test",
    num_formulas: Annotated[int, typer.Option(help="How many distinct formulas.")] = 20,
    samples_per_formula: Annotated[int, typer.Option(help="Samples per formula.")] = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 512,
    seed: int = 0,
    data_dir: DataDirOption = None,
) -> None:
    """Sample structures for a split's formulas; writes JSONL (id, formula, text, parse status, CIF)."""
    from crystals.data import DataError, split_formulas
    from grpo.models import load_model_and_tokenizer

    if out.exists() and out.is_dir():
        raise fail(f"--out {out} is a directory; give a .jsonl file path")
    try:
        formulas = split_formulas(split, data_dir, seed=seed, limit=num_formulas)
    except DataError as err:
        raise fail(str(err)) from None
    try:
        policy, tokenizer = load_model_and_tokenizer(model, dtype="auto")
    except OSError as err:
        raise fail(f"cannot load model {model!r}: {err}") from None
    records = generate_samples(
        policy,
        tokenizer,
        formulas,
        samples_per_formula=samples_per_formula,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        builder=prompt_builder(RunConfig(seed=seed)),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    parsed = sum(r["parse"] == "ok" for r in records)
    console.print(f"wrote {len(records)} samples to {out}; {parsed} parse as crystals ({parsed / max(1, len(records)):.0%})")


# --------------------------------------------------------------------------------------------------------------
# reward
# --------------------------------------------------------------------------------------------------------------
def read_samples(path: Path) -> list[tuple[str | None, str]]:
    """(prompt formula or None, structure text) from a JSONL of samples, a CIF or a bulk-text file."""
    from crystals.text import format_structure, read_cif

    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(row.get("formula"), row.get("text") or "") for row in rows]
    text = path.read_text()
    if path.suffix.lower() == ".cif" or "_cell_length_a" in text:
        return [(None, format_structure(read_cif(text)))]
    return [(None, text)]


@app.command()
def reward(
    files: Annotated[list[Path], typer.Argument(help="Bulk-text, CIF or samples JSONL files.")],
    reward: Annotated[str, typer.Option(help="Reward name (see --list).")] = RewardConfig.name,
    list_: Annotated[bool, typer.Option("--list", help="List the registered rewards and exit.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Score structure files with any registered reward and print a table."""
    from crystals.text import ParseError, parse_structure
    from rewards.registry import available_rewards

    if list_:
        for name, description in available_rewards().items():
            console.print(f"[bold]{name}[/bold]: {description}")
        return
    reward_fn = build_reward_fn(RewardConfig(name=reward), data_dir)
    metas, texts, names = [], [], []
    for path in files:
        try:
            rows = read_samples(path)
        except (OSError, ValueError, ParseError) as err:
            raise fail(f"cannot read {path}: {err}") from None
        for i, (formula, text) in enumerate(rows):
            if formula is None:
                try:
                    formula = parse_structure(text).composition.reduced_formula
                except ParseError:
                    formula = "H"  # unparseable text: scored as a parse error whatever the prompt
            metas.append({"formula": formula})
            texts.append(text)
            names.append(f"{path.name}#{i}" if len(rows) > 1 else path.name)
    rewards_, infos = reward_fn(metas, texts)
    table = Table("sample", "formula", "reward", "penalty")
    for name, meta, value, info in zip(names, metas, rewards_, infos, strict=True):
        table.add_row(name, meta["formula"], f"{value:.4f}", str(info.get("penalty") or ""))
    console.print(table)


def main() -> None:  # pragma: no cover - console-script convenience
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
