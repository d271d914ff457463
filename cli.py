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
    typer.Option(
        "--data-dir",
        help="Folder with {train,val,test}.csv.gz (or its parent); default: $CRYSTAL_GRPO_DATA, else the packaged demo subset.",
    ),
]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML config file (tables per config).")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (repeatable).")
]


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

    table = Table(
        "file", "formula", "atoms", "parse", "CDVAE 0.5 A", "covalent", "SMACT", f"<= {max_atoms} atoms"
    )
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
    # "line": the paper's one-line text. "lines": lattice, then one atom per line; the same tokens plus
    # newlines, which a small model learns to lay out much sooner (the parser reads both).
    structure_layout: Literal["line", "lines"] = "line"
    # GRPO rollouts: "hf" (transformers generate on the policy), "vllm" (a vLLM engine in this process) or
    # "vllm-server" (a vLLM worker process, weights broadcast over gloo/NCCL); the vllm ones need the extra.
    generator: Literal["hf", "vllm", "vllm-server"] = "hf"
    seed: int = 0


def load_crystal_texts(run: RunConfig, split: str, limit: int | None) -> list[tuple[str, str]]:
    """(reduced formula, bulk text) of each structure of a split, in the run's text layout."""
    from crystals.data import iter_split
    from crystals.text import format_structure

    separator = "\n" if run.structure_layout == "lines" else " "
    return [
        (r.formula, format_structure(r.structure, separator=separator))
        for r in iter_split(split, run.data_dir, limit=limit)
    ]


def prompt_builder(run: RunConfig, train_texts: list[str] | None = None):
    from crystals.prompts import PromptBuilder

    if run.prompt_examples == "train":
        return PromptBuilder(examples="train", train_texts=train_texts or [], seed=run.seed)
    return PromptBuilder(examples="paper", seed=run.seed)


def initial_model_source(
    run: RunConfig, run_dir: Path, train_pairs: list[tuple[str, str]] | None = None
) -> str:
    """Path or name of the run's starting model. A size name builds a fresh small Qwen2 with a BPE tokenizer
    trained on crystal text and the prompt, saved once under run_dir/initial_model (a resumed run reuses it)."""
    from grpo.models import MODEL_SIZES, build_small_model, save_model, train_bpe_tokenizer

    if run.model not in MODEL_SIZES or Path(run.model).exists():
        return run.model
    initial = run_dir / "initial_model"
    if not (initial / "config.json").exists():
        pairs = train_pairs if train_pairs is not None else load_crystal_texts(run, "train", run.train_limit)
        builder = prompt_builder(run, [t for _, t in pairs])
        corpus = [t for _, t in pairs] + [builder.build(f).user_text for f, _ in pairs[:500]]
        tokenizer = train_bpe_tokenizer(
            corpus,
            vocab_size=run.tokenizer_vocab_size,
            split_digits=run.tokenizer_split_digits,
            phrases=builder.fixed_phrases(),
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
def train_and_save(trainer, checkpoint: Path | None, out: Path, label: str, progress: bool) -> Path:
    """Resume the trainer from `checkpoint` (if any), train to the end, save RUN/final_model. In a sharded run
    every rank calls this (the final save gathers the shards); rank 0 alone prints and writes."""
    from grpo.distributed import is_main, save_pretrained_full

    if checkpoint is not None:
        trainer.restore(checkpoint)
        if is_main():
            console.print(f"resumed from {checkpoint} (step {trainer.step_count})")
    elif is_main():
        trainer.logger.truncate_after(0)  # a fresh start: records of an abandoned earlier run must not mix in
    trainer.train(progress=progress)
    final = save_pretrained_full(trainer.model, trainer.tokenizer, out / "final_model")
    if is_main():
        console.print(f"{label} done: {trainer.step_count} steps; model saved to {final}")
    return final


def run_sft(run: RunConfig, sft_config, out: Path, *, resume: bool = True, progress: bool = True) -> Path:
    """Supervised fine-tuning into run directory `out`; returns the final model's path. Raises DataError."""
    from grpo.sft import SFTTrainer

    checkpoint = latest_to_resume(out, resume)
    train_pairs = load_crystal_texts(run, "train", run.train_limit)
    policy, tokenizer = load_policy(run, initial_model_source(run, out, train_pairs), checkpoint)
    val_pairs = load_crystal_texts(run, "val", sft_config.eval_samples)
    builder = prompt_builder(run, [t for _, t in train_pairs])
    trainer = SFTTrainer(
        model=policy,
        tokenizer=tokenizer,
        train_pairs=[(builder.build(f).to_text(tokenizer), t) for f, t in train_pairs],
        eval_pairs=[(builder.build(f).to_text(tokenizer), t) for f, t in val_pairs],
        config=sft_config,
        run_dir=out,
        console_log=progress,
    )
    return train_and_save(trainer, checkpoint, out, "SFT", progress)


@app.command()
def sft(
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, logs, resolved config).")],
    model: Annotated[
        str | None, typer.Option(help="Model path/name, or a size name: tiny, small, base.")
    ] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = True,
) -> None:
    """Supervised fine-tuning: prompt for a formula -> its ground-truth structure (MP-20 train), eval on val."""
    from crystals.data import DataError
    from grpo.sft import SFTConfig

    check_run_dir(out)
    configs = load_sections_or_fail({"run": RunConfig, "sft": SFTConfig}, config, set_)
    apply_cli_overrides(configs["run"], model=model, data_dir=data_dir)
    save_resolved_config(out, configs)
    try:
        run_sft(configs["run"], configs["sft"], out, resume=resume)
    except DataError as err:
        raise fail(str(err)) from None


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


def crystal_prompt_items(run: RunConfig, formulas: list[str], tokenizer) -> list:
    """GRPO prompts: the A.4 prompt per formula (chat template applied) with the formula and element set as
    metadata for the reward."""
    from grpo.trainer import PromptItem

    examples = (
        [t for _, t in load_crystal_texts(run, "train", 200)] if run.prompt_examples == "train" else None
    )
    builder = prompt_builder(run, examples)
    items = []
    for formula in formulas:
        prompt = builder.build(formula)
        items.append(
            PromptItem(
                prompt.to_text(tokenizer), {"formula": prompt.formula, "elements": sorted(prompt.elements)}
            )
        )
    return items


def build_generator(run: RunConfig, policy, tokenizer, out: Path):
    """The rollout engine of a GRPO run. A vLLM engine starts from the policy's current weights (saved once to
    RUN/vllm_weights), so a resumed run samples from the resumed model; the trainer syncs it after every update."""
    from grpo.distributed import world_size
    from grpo.generation import HFGenerator

    if run.generator == "hf":
        return HFGenerator(policy, tokenizer)
    if world_size() > 1:
        raise fail(
            f"generator {run.generator!r} with a sharded (torchrun) run is not supported; use run.generator=hf"
        )
    from grpo.models import save_model
    from grpo.vllm_generator import VLLMConfig, VLLMGenerator, VLLMServerGenerator

    engine = VLLMGenerator if run.generator == "vllm" else VLLMServerGenerator
    weights = save_model(policy, tokenizer, out / "vllm_weights")
    try:
        return engine(weights, tokenizer, VLLMConfig(dtype=str(policy.dtype).removeprefix("torch.")))
    except ImportError as err:
        raise fail(str(err)) from None


def run_grpo(
    run: RunConfig, grpo_config, reward_fn, out: Path, *, resume: bool = True, progress: bool = True
) -> Path:
    """GRPO into run directory `out` on the training split's formulas; returns the final model's path.

    Under `torchrun --nproc-per-node N` every process runs this: the policy and the reference model are
    sharded with FSDP2 (grpo.distributed) and each rank samples its share of the step's prompts."""
    from crystals.data import split_formulas
    from grpo.distributed import barrier, init_distributed, is_main, setup_sharded
    from grpo.models import load_model_and_tokenizer
    from grpo.trainer import GRPOTrainer

    sharded = init_distributed()
    checkpoint = latest_to_resume(out, resume)
    if is_main():  # builds RUN/initial_model once for a size name; the other ranks then read it
        initial_model_source(run, out)
    barrier()
    source = initial_model_source(run, out)
    policy, tokenizer = load_policy(run, source, checkpoint)
    formulas = split_formulas("train", run.data_dir, seed=run.seed, limit=run.train_limit)
    ref_model = None
    if grpo_config.kl_coef > 0:  # the frozen starting model, for the KL term
        ref_model, _ = load_model_and_tokenizer(source, dtype=run.dtype)
        ref_model.requires_grad_(False)
    if sharded:
        setup_sharded(policy, ref_model)
    generator = build_generator(run, policy, tokenizer, out)
    trainer = GRPOTrainer(
        model=policy,
        tokenizer=tokenizer,
        generator=generator,
        prompts=crystal_prompt_items(run, formulas, tokenizer),
        reward_fn=reward_fn,
        config=grpo_config,
        run_dir=out,
        ref_model=ref_model,
        console_log=progress,
    )
    try:
        return train_and_save(trainer, checkpoint, out, "GRPO", progress)
    finally:
        if hasattr(generator, "close"):
            generator.close()


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, logs, resolved config).")],
    model: Annotated[
        str | None,
        typer.Option(help="Starting model: a path (e.g. an SFT run's final_model), hub name, or size name."),
    ] = None,
    reward: Annotated[
        str | None, typer.Option(help="Reward: chgnet-etot, ehull, 'ehull+species+diversity', module:attr.")
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(help="Rollouts: hf (default), vllm (in process), vllm-server (worker process)."),
    ] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = True,
) -> None:
    """GRPO on prompts for the training split's formulas, rewarded by a crystal reward.

    Sharded on N processes: `torchrun --nproc-per-node N $(which crystal-grpo) train ...` (gloo on CPU)."""
    from crystals.data import DataError
    from grpo.distributed import init_distributed, is_main, shutdown
    from grpo.trainer import GRPOConfig

    check_run_dir(out)
    configs = load_sections_or_fail(
        {"run": RunConfig, "grpo": GRPOConfig, "reward": RewardConfig}, config, set_
    )
    apply_cli_overrides(configs["run"], model=model, data_dir=data_dir, generator=generator)
    apply_cli_overrides(configs["reward"], name=reward)
    if configs["run"].generator not in ("hf", "vllm", "vllm-server"):
        raise fail(f"unknown generator {configs['run'].generator!r}; choose hf, vllm or vllm-server")
    reward_fn = build_reward_fn(configs["reward"], configs["run"].data_dir)
    try:
        sharded = init_distributed()
    except RuntimeError as err:  # accelerate launch with FSDP on CPU
        raise fail(str(err)) from None
    if is_main():
        save_resolved_config(out, configs)
    try:
        run_grpo(configs["run"], configs["grpo"], reward_fn, out, resume=resume)
    except DataError as err:
        raise fail(str(err)) from None
    finally:
        if sharded:  # only the group torchrun asked for (an in-process vLLM engine makes and removes its own)
            shutdown()


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
            record = {
                "id": f"{prompt.formula}-{start + i // samples_per_formula}-{i % samples_per_formula}",
                "formula": prompt.formula,
                "text": text,
            }
            try:
                structure = parse_structure(text)
                record |= {"parse": "ok", "cif": write_cif(structure)}
            except ParseError as err:
                record |= {"parse": err.reason, "cif": None}
            records.append(record)
    return records


def write_samples(model: str | Path, formulas: list[str], out: Path, **sampling) -> list[dict]:
    """Sample from a saved model for `formulas` and write the records to JSONL atomically (temp file + rename)."""
    from grpo.models import load_model_and_tokenizer

    policy, tokenizer = load_model_and_tokenizer(model, dtype="auto")
    records = generate_samples(
        policy, tokenizer, formulas, builder=prompt_builder(RunConfig(seed=sampling["seed"])), **sampling
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
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

    if out.exists() and out.is_dir():
        raise fail(f"--out {out} is a directory; give a .jsonl file path")
    try:
        formulas = split_formulas(split, data_dir, seed=seed, limit=num_formulas)
    except DataError as err:
        raise fail(str(err)) from None
    try:
        records = write_samples(
            model,
            formulas,
            out,
            samples_per_formula=samples_per_formula,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    except OSError as err:
        raise fail(f"cannot load model {model!r}: {err}") from None
    parsed = sum(r["parse"] == "ok" for r in records)
    console.print(
        f"wrote {len(records)} samples to {out}; {parsed} parse as crystals ({parsed / max(1, len(records)):.0%})"
    )


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


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------
@app.command()
def evaluate(
    samples: Annotated[
        list[Path],
        typer.Argument(help="Samples JSONL files (formula, text[, id]); several -> one comparison."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Report directory; re-running resumes the relaxations.")],
    relaxer: Annotated[
        str, typer.Option(help="chgnet, sevenn or uma (UMA: --relaxer-option checkpoint=PATH).")
    ] = "chgnet",
    relaxer_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the relaxer's calculator.")
    ] = None,
    train_data: DataDirOption = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Use only the first N training structures for novelty.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Relaxation processes (default: one per core).")] = None,
    fmax: Annotated[float, typer.Option(help="Relaxation force threshold, eV/A (paper: 0.02).")] = 0.02,
    max_steps: Annotated[int, typer.Option(help="Relaxation steps at most (paper: 100).")] = 100,
    timeout: Annotated[
        float, typer.Option(help="Seconds per structure before it is recorded as timed out.")
    ] = 600.0,
    training_log: Annotated[
        Path | None, typer.Option(help="A run's train_log.jsonl, for the training-curve plot.")
    ] = None,
) -> None:
    """Relax generated structures and write the paper's Table 1 and Table 2, metrics.json, CSV, CIFs and plots."""
    from crystals.data import DataError
    from evaluation.relax import RelaxConfig
    from evaluation.report import evaluate_samples

    missing = [str(p) for p in samples if not p.is_file()]
    if missing:
        raise fail(f"samples file(s) not found: {', '.join(missing)}")
    check_run_dir(out)
    options = {}
    for item in relaxer_option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--relaxer-option {item!r} must look like KEY=VALUE")
        options[key] = value
    try:
        evaluate_samples(
            samples,
            out_dir=out,
            relaxer=relaxer,
            relaxer_options=options,
            data_dir=train_data,
            train_limit=train_limit,
            workers=workers,
            relax_config=RelaxConfig(fmax=fmax, max_steps=max_steps, timeout_s=timeout),
            training_log=training_log,
        )
    except (DataError, ValueError, ImportError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    for name in ("table1.md", "table2.md"):
        console.print((out / name).read_text())
    console.print(f"report written to {out}")


# --------------------------------------------------------------------------------------------------------------
# demo: the whole pipeline, resumable stage by stage
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    """Every knob of the demo. The defaults fit ~15 minutes on 2 CPU cores; `--quick` shrinks them (QUICK_DEMO)."""

    model_size: str = "tiny"
    structure_layout: Literal["line", "lines"] = "lines"
    # SFT is most of the demo's time. With the prompt's fixed sentences as single tokens a pair is ~80 tokens
    # (~230 word by word); 400 steps of 16 pairs is ~4 passes over the 1,500 packaged training structures.
    sft_steps: int = 400
    sft_batch_size: int = 16
    sft_lr: float = 2e-3
    # Few prompts with large groups: most samples of a tiny SFT model are penalised, and a group needs at least
    # one scored sample to give an advantage at all.
    grpo_steps: int = 8
    grpo_prompts_per_step: int = 2
    grpo_group_size: int = 16
    grpo_lr: float = 2e-5
    grpo_kl_coef: float = 0.001
    max_new_tokens: int = 160
    eval_formulas: int = 8
    samples_per_formula: int = 2
    relax_steps: int = 100
    # A generated cell that collapses or explodes while relaxing can hold CHGNet for many minutes (seen: 7 min
    # and 5 GB per worker); past this it is recorded as timed out and the evaluation goes on.
    relax_timeout_s: float = 60.0
    novelty_train_limit: int = 200
    reward: str = RewardConfig.name
    seed: int = 0


QUICK_DEMO = {
    "sft_steps": 40,
    "sft_batch_size": 8,
    "grpo_steps": 2,
    "grpo_prompts_per_step": 2,
    "grpo_group_size": 4,
    "eval_formulas": 4,
    "samples_per_formula": 2,
    "relax_steps": 10,
    "novelty_train_limit": 20,
}
DEMO_STAGES = ("model", "sft", "grpo", "sample", "evaluate")


class StageLog:
    """Which demo stages are finished and how long each took, kept in RUN/stages.json (written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("done", False)

    def finish(self, stage: str, seconds: float) -> None:
        self.stages[stage] = {"done": True, "seconds": round(seconds, 1)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.stages, indent=2))
        tmp.replace(self.path)


def demo_configs(demo: DemoConfig, data_dir: str | None) -> dict:
    """The run, SFT, GRPO and reward configs the demo's stages use."""
    from grpo.sft import SFTConfig
    from grpo.trainer import GRPOConfig

    run = RunConfig(
        model=demo.model_size, data_dir=data_dir, structure_layout=demo.structure_layout, seed=demo.seed
    )
    sft_config = SFTConfig(
        total_steps=demo.sft_steps,
        batch_size=demo.sft_batch_size,
        lr=demo.sft_lr,
        warmup_steps=min(20, demo.sft_steps // 10),
        eval_every=max(1, demo.sft_steps // 4),
        eval_samples=64,
        checkpoint_every=max(1, demo.sft_steps // 4),
        log_every=max(1, demo.sft_steps // 20),
        seed=demo.seed,
    )
    grpo_config = GRPOConfig(
        total_steps=demo.grpo_steps,
        prompts_per_step=demo.grpo_prompts_per_step,
        group_size=demo.grpo_group_size,
        micro_batch_size=16,
        lr=demo.grpo_lr,
        kl_coef=demo.grpo_kl_coef,
        max_new_tokens=demo.max_new_tokens,
        checkpoint_every=max(1, demo.grpo_steps // 4),
        seed=demo.seed,
    )
    return {"run": run, "sft": sft_config, "grpo": grpo_config, "reward": RewardConfig(name=demo.reward)}


def check_demo_config(out: Path, demo: DemoConfig) -> None:
    """A run directory continues only the demo that wrote it: a different config is refused, not mixed in."""
    from grpo.config import ConfigError, build_config, read_toml, to_toml

    saved_path = out / "demo_config.toml"
    if saved_path.exists():
        try:
            saved = build_config(DemoConfig, read_toml(saved_path).get("demo"), section="demo")
        except ConfigError as err:
            raise fail(f"{out} holds a run of an incompatible demo config ({err}); use a new --out") from None
        if saved != demo:
            changed = sorted(k for k in vars(demo) if getattr(saved, k) != getattr(demo, k))
            raise fail(
                f"{out} holds a demo run with different settings ({', '.join(changed)}); use a new --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(to_toml({"demo": demo}))


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Run directory; re-run with the same --out to resume.")
    ] = Path("runs/demo"),
    reward: Annotated[str | None, typer.Option(help="RL reward, as for `train` (e.g. ehull).")] = None,
    data_dir: DataDirOption = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shrink every stage (about 3 minutes).")] = False,
) -> None:
    """The whole pipeline on the embedded default: small model -> SFT -> GRPO -> sample -> relax -> Tables 1 and 2."""
    import time

    from crystals.data import DataError, resolve_data_dir, split_formulas

    check_run_dir(out)
    demo_config = DemoConfig(**(QUICK_DEMO if quick else {}))
    if reward is not None:
        demo_config.reward = reward
    try:
        data_path = resolve_data_dir(data_dir)
    except DataError as err:
        raise fail(str(err)) from None
    configs = demo_configs(demo_config, str(data_dir) if data_dir else None)
    reward_fn = build_reward_fn(configs["reward"], configs["run"].data_dir)
    check_demo_config(out, demo_config)
    save_resolved_config(out, configs)
    stages = StageLog(out / "stages.json")
    sft_dir, grpo_dir, samples_dir = out / "sft", out / "grpo", out / "samples"
    console.print(f"[bold]crystal-grpo demo[/bold] -> {out} (data: {data_path})")

    def stage(name: str, work) -> None:
        if stages.done(name):
            console.print(
                f"[dim]stage {name}: done earlier ({stages.stages[name]['seconds']} s), skipped[/dim]"
            )
            return
        console.rule(f"stage {name}")
        t0 = time.perf_counter()
        work()
        stages.finish(name, time.perf_counter() - t0)

    try:
        stage("model", lambda: initial_model_source(configs["run"], sft_dir))
        stage("sft", lambda: run_sft(configs["run"], configs["sft"], sft_dir))
        grpo_run = RunConfig(**{**vars(configs["run"]), "model": str(sft_dir / "final_model")})
        stage("grpo", lambda: run_grpo(grpo_run, configs["grpo"], reward_fn, grpo_dir))
        formulas = split_formulas(
            "test", configs["run"].data_dir, seed=demo_config.seed, limit=demo_config.eval_formulas
        )
        sampling = {
            "samples_per_formula": demo_config.samples_per_formula,
            "temperature": 1.0,
            "max_new_tokens": demo_config.max_new_tokens,
            "seed": demo_config.seed,
        }

        def sample_both() -> None:
            for arm, model_dir in (("sft", sft_dir), ("sft_rl", grpo_dir)):
                records = write_samples(
                    model_dir / "final_model", formulas, samples_dir / f"{arm}.jsonl", **sampling
                )
                parsed = sum(r["parse"] == "ok" for r in records)
                console.print(f"{arm}: {parsed}/{len(records)} samples parse as crystals")

        stage("sample", sample_both)
        stage("evaluate", lambda: evaluate_demo(out, demo_config, data_path))
    except DataError as err:
        raise fail(str(err)) from None
    print_demo_report(out, stages)


@app.command()
def bench(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Benchmarks to run (default all): grpo_step, rollout, reward, weight_sync."),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small configurations (under 3 minutes).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Where results.json and results.md go.")] = Path("bench"),
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core).")] = None,
) -> None:
    """Throughput benchmarks, side by side in one run: our GRPO step vs TRL's, HF vs vLLM rollout, rewards,
    weight sync. Writes JSON and a Markdown table with machine info."""
    from benchmarks.run import run_benchmarks

    check_run_dir(out)
    try:
        markdown = run_benchmarks(names, quick, out, threads)
    except ValueError as err:
        raise fail(str(err)) from None
    console.print(markdown.read_text())
    console.print(f"results: {markdown} and {markdown.with_name('results.json')}")


def evaluate_demo(out: Path, demo_config: DemoConfig, data_path: Path) -> None:
    from evaluation.relax import RelaxConfig
    from evaluation.report import evaluate_samples

    evaluate_samples(
        [out / "samples" / "sft.jsonl", out / "samples" / "sft_rl.jsonl"],
        out_dir=out / "report",
        data_dir=data_path,
        train_limit=demo_config.novelty_train_limit,
        relax_config=RelaxConfig(max_steps=demo_config.relax_steps, timeout_s=demo_config.relax_timeout_s),
        training_log=out / "grpo" / "train_log.jsonl",
    )


def print_demo_report(out: Path, stages: StageLog) -> None:
    report = out / "report"
    for name in ("table1.md", "table2.md", "extra.md"):
        if (report / name).exists():
            console.print((report / name).read_text())
    table = Table("stage", "seconds")
    for name in DEMO_STAGES:
        table.add_row(name, str(stages.stages.get(name, {}).get("seconds", "-")))
    console.print(table)
    console.print(
        f"report: {report}  (metrics.json, table1.md, table2.md, plots, CIFs of metastable candidates)"
    )


def main() -> None:  # pragma: no cover - console-script convenience
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
