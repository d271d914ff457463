"""SFT, GRPO and sampling on crystals: MP-20 structures become prompts and (prompt, structure) pairs, the
domain-free trainers of `grpo` train on them, a `rewards` callable scores GRPO's samples.

Every function here is what a command runs; the CLI only parses options. A function changes its run directory
only once everything it needs (data, model, reward) has loaded, so a bad invocation leaves an existing run as it
was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from crystals.cell_volume import CellVolumeRule
from crystals.data import iter_split, split_formulas
from crystals.grammar import SEPARATORS, structure_grammar
from crystals.prompts import CrystalPrompt, PromptBuilder, parse_formula
from crystals.sample import Sample
from crystals.separation import SeparationRule
from crystals.text import (
    ParseError,
    canonical_structure,
    format_structure,
    parse_structure,
    read_cif,
    write_cif,
)
from evaluation.relax import RelaxConfig
from grpo.atomic import atomic_write_text
from grpo.checkpoint import checkpoint_dir, latest_checkpoint
from grpo.constraint import TokenRules
from grpo.distributed import (
    barrier,
    is_main,
    load_sharded,
    process_group,
    resolve_device,
    save_pretrained_full,
    sharding_config,
)
from grpo.generation import GeneratorConfig, SamplingConfig, build_generator, decode_responses
from grpo.models import (
    MODEL_SIZES,
    build_small_model,
    load_model_and_tokenizer,
    save_model,
    train_bpe_tokenizer,
)
from grpo.precision import COMPUTE_DTYPES, PrecisionError, check_master_weights, resolve_compute_dtype
from grpo.sft import SFTConfig, SFTTrainer
from grpo.trainer import GRPOConfig, GRPOTrainer, PromptItem, RewardFailedError
from pipeline.config import (
    EvaluateConfig,
    PipelineError,
    RewardConfig,
    RunConfig,
    SampleConfig,
    check_run_dir,
    key_values,
    refuse_changed_settings,
    save_resolved_config,
)

console = Console()


def quiet_libraries() -> None:
    """What a command prints is its own stage and step lines: no per-load progress bars or warnings from the
    libraries underneath (transformers' weight loading and saving bars, pymatgen's electronegativity and
    CHGNet's tensor warnings). Our own problems are still logged."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


# training structures that serve as the prompt's examples when run.prompt_examples = "train"
PROMPT_EXAMPLE_POOL = 200


# -- data -> text, prompts and pairs ---------------------------------------------------------------------------
def load_crystal_texts(run: RunConfig, split: str, limit: int | None) -> list[tuple[str, str]]:
    """(reduced formula, bulk text) of each structure of a split: its canonical form (Niggli cell, atoms grouped
    by element; what the grammars of crystals.grammar describe) in the run's text layout."""
    separator = SEPARATORS[run.structure_layout]
    return [
        (r.formula, format_structure(canonical_structure(r.structure), separator=separator))
        for r in iter_split(split, run.data_dir, limit=limit)
    ]


def prompt_builder(run: RunConfig, train_texts: Sequence[str] | None = None) -> PromptBuilder:
    """The A.4 prompt builder of a run: the paper's two examples, or two training structures per formula."""
    if run.prompt_examples == "train":
        if train_texts is None:
            train_texts = [t for _, t in load_crystal_texts(run, "train", PROMPT_EXAMPLE_POOL)]
        return PromptBuilder(examples="train", train_texts=train_texts, seed=run.seed)
    return PromptBuilder(examples="paper", seed=run.seed)


def response_grammar(run: RunConfig, formula: str) -> str | None:
    """The grammar a response to `formula`'s prompt is sampled under (None: unconstrained)."""
    try:
        return structure_grammar(
            run.constraint, formula, layout=run.structure_layout, max_atoms=run.max_atoms
        )
    except ValueError as err:
        raise PipelineError(f"constraint {run.constraint!r} for {formula}: {err}") from None


def token_rule(run: RunConfig, generator: GeneratorConfig) -> TokenRules | None:
    """The rules on top of the run's grammar (`run.volume_floor` and `run.volume_ceiling`, then
    `run.separation`), or None; they need the HF generator."""
    settings = _rule_settings(run)
    if not settings:
        return None
    if generator.kind != "hf":
        raise PipelineError(
            f"run.{' and run.'.join(settings)} need the hf generator (a vLLM engine runs the grammar alone), "
            f"not {generator.kind}"
        )
    rules = []
    if "volume_floor" in settings or "volume_ceiling" in settings:
        rules.append(CellVolumeRule(run.volume_floor, run.volume_ceiling))
    if "separation" in settings:
        rules.append(SeparationRule(run.separation))
    return TokenRules(rules)


def _rule_settings(run: RunConfig) -> dict[str, float]:
    """The token rules a run turns on, in the order they narrow: the cell first, then the atoms in it."""
    if run.constraint == "none":
        return {}
    settings = {
        "volume_floor": run.volume_floor,
        "volume_ceiling": run.volume_ceiling,
        "separation": run.separation,
    }
    return {name: value for name, value in settings.items() if value}


def constraint_label(run: RunConfig) -> str:
    """What the samples were drawn under, as sample records and report rows name it."""
    rules = _rule_settings(run)
    names = {"volume_floor": "volume floor", "volume_ceiling": "volume ceiling", "separation": "separation"}
    return " + ".join([run.constraint] + [f"{names[name]} {value:g}" for name, value in rules.items()])


def crystal_prompt_items(
    run: RunConfig, formulas: Sequence[str], tokenizer, builder: PromptBuilder
) -> list[PromptItem]:
    """GRPO prompts: the A.4 prompt per formula (chat template applied) with the formula and element set as
    metadata for the reward, and the run's constraint on its responses."""
    items = []
    for formula in formulas:
        prompt = builder.build(formula)
        meta = {"formula": prompt.formula, "elements": sorted(prompt.elements)}
        items.append(PromptItem(prompt.to_text(tokenizer), meta, response_grammar(run, prompt.formula)))
    return items


# -- models --------------------------------------------------------------------------------------------------
def initial_model_source(
    run: RunConfig,
    run_dir: Path,
    train_pairs: list[tuple[str, str]] | None = None,
    rebuild: bool = False,
) -> str:
    """Path or name of the run's starting model. A size name builds a fresh small Qwen2 with a BPE tokenizer
    trained on crystal text and the prompt, saved once under run_dir/initial_model (a resumed run reuses it;
    `rebuild` replaces one that may come from other settings, see rebuild_initial_model).
    save_model writes it atomically, so a directory that is there is whole: a run killed while saving it
    leaves none (only a temporary directory, cleared by the next save) and the rerun builds it again."""
    if run.model not in MODEL_SIZES or Path(run.model).exists():
        return run.model
    initial = run_dir / "initial_model"
    if rebuild or not initial.is_dir():
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


def check_model_path(path: str | Path) -> None:
    """A PipelineError at once for a path that is plainly meant as a local model but holds none (HF would
    answer with a hub error, or a tokenizer's). A hub name ("org/model") or a size name is not judged."""
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        problem = None if local.is_file() else "no such file or directory"
    elif local.is_file():
        problem = "a file, not a model directory (give the folder a model was saved to)"
    elif local.is_dir():
        problem = None if (local / "config.json").is_file() else "no config.json in it: not a saved model"
    elif local.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1:
        problem = "no such file or directory"
    else:
        problem = None
    if problem is not None:
        raise PipelineError(f"cannot load model {str(path)!r}: {problem}")


def rebuild_initial_model(out: Path, resume: bool, record: dict | None) -> bool:
    """Whether RUN/initial_model must be built again, not reused: a run started over (--no-resume) may have
    other settings, and so may one whose settings were never recorded (an attempt that failed or was killed
    before RUN/config.toml was written, which refuse_changed_settings would compare against). `record`: the
    configs the caller records (None: the caller, the demo, guards the settings itself)."""
    return not resume or (record is not None and not (out / "config.toml").is_file())


def run_device(run: RunConfig) -> torch.device:
    """The device `run.device` names on this machine (this rank's GPU under torchrun); a PipelineError saying
    what is there when it is not."""
    try:
        return resolve_device(run.device)
    except ValueError as err:
        raise PipelineError(f"run.device: {err}") from None


def load_model(
    run: RunConfig,
    path: str | Path,
    *,
    dtype: str | None = None,
    trainable: bool = True,
    sharded: bool = False,
):
    """(model, tokenizer) from a path or hub name, on the run's device, in `dtype` (default: run.dtype); a
    model that cannot be loaded is a PipelineError naming it. `sharded` (torchrun): FSDP2-sharded as it loads
    (grpo.distributed.load_sharded), in the run's compute dtype (bf16 mixed precision) and a frozen one
    (`trainable=False`) offloaded to host memory on GPUs."""
    check_model_path(path)
    device = run_device(run)
    dtype = dtype or run.dtype
    checkpointing = trainable and run.gradient_checkpointing
    try:
        if sharded:
            sharding = sharding_config(compute_dtype(run))
            return load_sharded(
                path,
                dtype=dtype,
                config=sharding,
                frozen=not trainable,
                gradient_checkpointing=checkpointing,
                on=device,
            )
        return load_model_and_tokenizer(
            path, dtype=dtype, gradient_checkpointing=checkpointing, device=device
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load model {str(path)!r}: {first_line}") from None


def load_policy(run: RunConfig, source: str, checkpoint: Path | None, sharded: bool = False):
    """The policy to train: the newest checkpoint's weights when resuming, else the starting model."""
    return load_model(run, checkpoint / "model" if checkpoint is not None else source, sharded=sharded)


def compute_dtype_name(run: RunConfig) -> str:
    """run.compute_dtype with "auto" resolved for the run's device (grpo.precision.resolve_compute_dtype)."""
    return resolve_compute_dtype(run.compute_dtype, run_device(run))


def compute_dtype(run: RunConfig) -> torch.dtype:
    return COMPUTE_DTYPES[compute_dtype_name(run)]


def load_reference(run: RunConfig, source: str, sharded: bool = False):
    """The frozen starting model of the KL term, stored in the compute dtype: it is never updated, so it needs
    no float32 masters (bf16 compute: half the memory)."""
    model, _ = load_model(run, source, dtype=compute_dtype_name(run), trainable=False, sharded=sharded)
    return model.requires_grad_(False)


def check_precision(policy, lr: float) -> None:
    """The trainers' refusal of master weights too coarse for their lr (grpo.precision), as a PipelineError
    and before a rollout engine starts."""
    try:
        check_master_weights(policy, lr)
    except PrecisionError as err:
        raise PipelineError(
            f"run.dtype: {err}: --set run.dtype=float32 --set run.compute_dtype=bfloat16"
        ) from None


def latest_to_resume(out: Path, resume: bool) -> Path | None:
    return latest_checkpoint(out) if resume else None


def build_reward_fn(reward: RewardConfig, data_dir: str | Path | None, max_atoms: int = 20):
    """The (metas, texts) -> (rewards, infos) callable (texts of more than `max_atoms` atoms are penalised); a
    bad name or missing data is a PipelineError."""
    from crystals.data import DataError
    from rewards.base import CrystalTextReward
    from rewards.registry import resolve_reward

    try:
        resolved = resolve_reward(reward.name, data_dir=data_dir, device=reward.device, **reward.options)
    except (ValueError, KeyError, TypeError, ImportError, DataError) as err:
        raise PipelineError(f"reward {reward.name!r}: {err}") from None
    return CrystalTextReward(resolved, max_atoms=max_atoms)


# -- sft / grpo ----------------------------------------------------------------------------------------------
def train_and_save(trainer, checkpoint: Path | None, out: Path, label: str, progress: bool) -> Path:
    """Resume the trainer from `checkpoint` (if any), train to the end, save RUN/final_model. In a sharded run
    every rank calls this (the final save gathers the shards); rank 0 alone prints and writes."""
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if is_main():
            console.print(f"resumed from {checkpoint} (step {trainer.step_count})", markup=False)
    elif is_main():
        # A fresh start: the records and checkpoints of an abandoned earlier run must not mix in (a later
        # resume would continue from its newest checkpoint, under this run's config.toml).
        trainer.logger.truncate_after(0)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    trainer.train(progress=progress)
    final = save_pretrained_full(trainer.model, trainer.tokenizer, out / "final_model")
    if is_main():
        console.print(f"{label} done: {trainer.step_count} steps; model saved to {final}", markup=False)
    return final


def run_sft(
    run: RunConfig,
    sft: SFTConfig,
    out: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    record: dict | None = None,
) -> Path:
    """Supervised fine-tuning into run directory `out` (prompt for a formula -> its ground-truth structure);
    returns the final model's path. `record`: configs to write to RUN/config.toml once everything loaded."""
    run_device(run)  # an unavailable device fails before anything is written
    checkpoint = latest_to_resume(out, resume)
    train_pairs = load_crystal_texts(run, "train", run.train_limit)
    val_pairs = load_crystal_texts(run, "val", sft.eval_samples)  # the data first: it writes nothing
    source = initial_model_source(run, out, train_pairs, rebuild_initial_model(out, resume, record))
    policy, tokenizer = load_policy(run, source, checkpoint)
    check_precision(policy, sft.lr)
    builder = prompt_builder(run, [t for _, t in train_pairs])
    try:
        trainer = SFTTrainer(
            model=policy,
            tokenizer=tokenizer,
            train_pairs=[(builder.build(f).to_text(tokenizer), t) for f, t in train_pairs],
            eval_pairs=[(builder.build(f).to_text(tokenizer), t) for f, t in val_pairs],
            config=sft,
            run_dir=out,
            console_log=progress,
            compute_dtype=compute_dtype(run),
        )
    except ValueError as err:  # settings that do not fit the data (e.g. every pair over sft.max_length)
        raise PipelineError(f"sft: {err}") from None
    if record is not None:
        save_resolved_config(out, record)
    return train_and_save(trainer, checkpoint, out, "SFT", progress)


def run_grpo(
    run: RunConfig,
    grpo: GRPOConfig,
    generator_config: GeneratorConfig,
    reward_fn,
    out: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    record: dict | None = None,
) -> Path:
    """GRPO into run directory `out` on the training split's formulas; returns the final model's path.
    `record`: configs to write to RUN/config.toml once everything loaded.

    Under `torchrun --nproc-per-node N` every process runs this: the policy and the reference model are
    sharded with FSDP2 as they load (grpo.distributed.load_sharded), each rank samples its share of the step's
    prompts, and a vLLM engine serves every rank from rank 0 (grpo.sharded_rollouts)."""
    device = run_device(run)  # an unavailable device fails before anything is written
    with process_group(on=device) as sharded:  # LaunchError: accelerate launch with FSDP on CPU
        checkpoint = latest_to_resume(out, resume)
        formulas = split_formulas("train", run.data_dir, seed=run.seed, limit=run.train_limit)
        if is_main():  # builds RUN/initial_model once for a size name; the other ranks then read it
            initial_model_source(run, out, rebuild=rebuild_initial_model(out, resume, record))
        barrier()
        source = initial_model_source(run, out)
        policy, tokenizer = load_policy(run, source, checkpoint, sharded)
        check_precision(policy, grpo.lr)
        ref_model = load_reference(run, source, sharded) if grpo.kl_coef > 0 else None
        prompts = crystal_prompt_items(run, formulas, tokenizer, prompt_builder(run))
        try:
            generator = build_generator(
                generator_config,
                policy,
                tokenizer,
                out / "vllm_weights",
                compute_dtype(run),
                token_rule(run, generator_config),
            )
        except ImportError as err:
            raise PipelineError(str(err)) from None
        try:
            try:
                trainer = GRPOTrainer(
                    model=policy,
                    tokenizer=tokenizer,
                    generator=generator,
                    prompts=prompts,
                    reward_fn=reward_fn,
                    config=grpo,
                    run_dir=out,
                    ref_model=ref_model,
                    console_log=progress,
                    compute_dtype=compute_dtype(run),
                )
            except ValueError as err:  # settings that do not fit this launch (e.g. the number of ranks)
                raise PipelineError(f"grpo: {err}") from None
            if record is not None and is_main():
                save_resolved_config(out, record)
            return train_and_save(trainer, checkpoint, out, "GRPO", progress)
        except RewardFailedError as err:
            raise PipelineError(str(err)) from None
        finally:
            if hasattr(generator, "close"):
                generator.close()


# -- what the commands run -----------------------------------------------------------------------------------
SFT_SECTIONS: dict[str, type] = {"run": RunConfig, "sft": SFTConfig}
TRAIN_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "grpo": GRPOConfig,
    "reward": RewardConfig,
    "generator": GeneratorConfig,
}
EVALUATE_SECTIONS: dict[str, type] = {"relax": RelaxConfig, "evaluate": EvaluateConfig}


def sft_from_configs(configs: dict, out: Path, resume: bool) -> Path:
    """`crystal-grpo sft`: SFT with the SFT_SECTIONS configs into `out`."""
    refuse_changed_settings(out, configs, resume)
    return run_sft(configs["run"], configs["sft"], out, resume=resume, record=configs)


def train_from_configs(configs: dict, out: Path, resume: bool) -> Path:
    """`crystal-grpo train`: GRPO with the TRAIN_SECTIONS configs into `out`."""
    refuse_changed_settings(out, configs, resume)
    run = configs["run"]
    check_model_path(run.model)  # in a moment, not after the reward's potential has loaded
    reward_fn = build_reward_fn(configs["reward"], run.data_dir, run.max_atoms)
    return run_grpo(run, configs["grpo"], configs["generator"], reward_fn, out, resume=resume, record=configs)


def evaluate_from_configs(
    configs: dict,
    samples: Sequence[Path],
    out: Path,
    relaxer_options: list[str],
    train_data: Path | None,
    training_log: Path | None,
) -> dict:
    """`crystal-grpo evaluate`: relax and report samples files with the EVALUATE_SECTIONS configs."""
    from evaluation.report import evaluate_samples

    check_run_dir(out)
    evaluate = configs["evaluate"]
    try:
        return evaluate_samples(
            samples,
            out_dir=out,
            relaxer=evaluate.relaxer,
            relaxer_options=key_values(relaxer_options, "--relaxer-option"),
            data_dir=train_data,
            train_limit=evaluate.train_limit,
            workers=evaluate.workers,
            relax_config=configs["relax"],
            training_log=training_log,
        )
    except (ValueError, ImportError, FileNotFoundError) as err:
        raise PipelineError(str(err)) from None


# -- sampling ------------------------------------------------------------------------------------------------
def sample_record(prompt: CrystalPrompt, sample_id: str, text: str, constraint: str) -> dict:
    """One JSON-ready sample: id, formula, the constraint it was drawn under, text, parse status and CIF (None
    when the text does not parse)."""
    record = {"id": sample_id, "formula": prompt.formula, "constraint": constraint, "text": text}
    try:
        record |= {"parse": "ok", "cif": write_cif(parse_structure(text))}
    except ParseError as err:
        record |= {"parse": err.reason, "cif": None}
    return record


def generate_samples(
    run: RunConfig, generator, tokenizer, formulas: Sequence[str], sample: SampleConfig, batch_size: int = 64
) -> list[dict]:
    """`sample.samples_per_formula` structures per formula under the run's constraint, one record each (see
    `sample_record`); `batch_size` sequences per generate call."""
    builder = prompt_builder(run)
    n = sample.samples_per_formula
    records = []
    per_call = max(1, batch_size // n)
    for start in range(0, len(formulas), per_call):
        prompts = [builder.build(f) for f in formulas[start : start + per_call]]
        sampling = SamplingConfig(
            temperature=sample.temperature, max_new_tokens=sample.max_new_tokens, seed=sample.seed + start
        )
        specs = [response_grammar(run, p.formula) for p in prompts]
        texts = [p.to_text(tokenizer) for p in prompts]
        rollout = generator.generate(texts, n, sampling, None if run.constraint == "none" else specs)
        for i, text in enumerate(decode_responses(tokenizer, rollout)):
            sample_id = f"{prompts[i // n].formula}-{start + i // n}-{i % n}"
            records.append(sample_record(prompts[i // n], sample_id, text, constraint_label(run)))
    return records


def samples_summary(records: Sequence[dict], max_atoms: int = 20) -> str:
    """What the samples are, in one line: parse rate, exact formula, element set, over max_atoms atoms, e.g.
    '1000/1000 parse (100%), exact formula 100%, element set 100%, 0 over 20 atoms'."""
    n = len(records)
    structures = [(r, parse_structure(r["text"])) for r in records if r["parse"] == "ok"]
    exact = sum(
        s.composition.reduced_composition == parse_formula(r["formula"]).reduced_composition
        for r, s in structures
    )
    same_elements = sum(
        set(s.composition.elements) == set(parse_formula(r["formula"]).elements) for r, s in structures
    )
    too_big = sum(len(s) > max_atoms for _, s in structures)
    share = lambda k: f"{k / max(1, n):.0%}"  # noqa: E731
    return (
        f"{len(structures)}/{n} parse ({share(len(structures))}), exact formula {share(exact)}, "
        f"element set {share(same_elements)}, {too_big} over {max_atoms} atoms"
    )


def write_samples(
    run: RunConfig,
    model: str | Path,
    sample: SampleConfig,
    out: Path,
    formulas: Sequence[str] | None = None,
    generator_config: GeneratorConfig | None = None,
) -> list[dict]:
    """Sample from a saved model for `formulas` (default: the sample config's split) with the generator the
    config names (default HF) and write the records to JSONL atomically (temp file + rename)."""
    if formulas is None:
        formulas = split_formulas(sample.split, run.data_dir, seed=sample.seed, limit=sample.num_formulas)
    generator_config = generator_config or GeneratorConfig()
    policy, tokenizer = load_model(run, model, dtype="auto", trainable=False)
    try:
        generator = build_generator(
            generator_config,
            policy,
            tokenizer,
            out.parent / f".{out.stem}-engine",
            compute_dtype(run),
            token_rule(run, generator_config),
        )
    except ImportError as err:
        raise PipelineError(str(err)) from None
    try:
        records = generate_samples(run, generator, tokenizer, formulas, sample, generator_config.batch_size)
    finally:
        if hasattr(generator, "close"):
            generator.close()
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return records


# -- structure files -----------------------------------------------------------------------------------------
def read_structure_file(path: Path):
    """A structure from a CIF file or a bulk-text file."""
    text = path.read_text()
    if path.suffix.lower() == ".cif" or "_cell_length_a" in text:
        return read_cif(text)
    return parse_structure(text)


def check_files(files: Sequence[Path], max_atoms: int) -> tuple[list[tuple], list[str]]:
    """(path, formula, atoms, [CDVAE, covalent, SMACT, atom-count checks]) of each readable structure file, and
    a line per file that could not be read."""
    from crystals.validity import (
        check_atom_count,
        check_composition_smact,
        check_structure_cdvae,
        check_structure_covalent,
    )

    rows, problems = [], []
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
        rows.append((path, structure.composition.reduced_formula, len(structure), checks))
    return rows, problems


def read_samples(path: Path, max_atoms: int) -> list[Sample]:
    """The samples of a structure file for `reward`: a samples JSONL through evaluation.report.load_samples
    (the reader `evaluate` uses: `text`, or `cif` when there is no text), a CIF, or a bulk-text file; a CIF's
    or text's prompt formula is its own. Text is parsed as in training (more than `max_atoms` atoms is a
    parse error)."""
    from evaluation.report import load_samples

    if path.suffix == ".jsonl":
        return load_samples(path, max_atoms)[1]
    text = path.read_text()
    if path.suffix.lower() == ".cif" or "_cell_length_a" in text:
        return [Sample.from_structure(read_cif(text))]
    try:
        formula = parse_structure(text).composition.reduced_formula
    except ParseError as err:  # no formula to prompt with: a parse error whatever the prompt
        return [Sample("-", frozenset(), text, None, err.reason)]
    return [Sample.from_text(formula, text, max_atoms)]


def score_files(files: Sequence[Path], reward_fn) -> list[tuple[str, str, float, str]]:
    """(sample name, formula, reward, penalty) of every structure in `files` (text, CIF or samples JSONL);
    `reward_fn` is a rewards.base.CrystalTextReward."""
    samples, names = [], []
    for path in files:
        try:
            found = read_samples(path, reward_fn.max_atoms)
        except (OSError, ParseError) as err:
            raise PipelineError(f"cannot read {path}: {err}") from None
        except ValueError as err:  # a bad samples line: load_samples names the file and the record
            raise PipelineError(str(err)) from None
        samples += found
        names += [f"{path.name}#{i}" if len(found) > 1 else path.name for i in range(len(found))]
    rewards, infos = reward_fn.score_samples(samples)
    return [
        (name, sample.formula, value, str(info.get("penalty") or ""))
        for name, sample, value, info in zip(names, samples, rewards, infos, strict=True)
    ]
