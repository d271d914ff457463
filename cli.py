"""`crystal-grpo`: the command line. Each command parses its options and calls the pipeline (pipeline.runs,
pipeline.demo), evaluation or benchmarks; errors a user can fix end as one line, exit code 1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

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


@app.callback()
def quiet() -> None:
    from pipeline.runs import quiet_libraries

    quiet_libraries()


def option(*flags_and_help: str):
    """A typer option: its flags (if not the parameter's name), then its help text."""
    *flags, help_text = flags_and_help
    return typer.Option(*flags, help=help_text)


DATA_DIR_HELP = (
    "Folder with {train,val,test}.csv.gz (or its parent); default: $CRYSTAL_GRPO_DATA, else the demo data."
)
DataDirOption = Annotated[Path | None, option("--data-dir", DATA_DIR_HELP)]
OutOption = Annotated[Path, option("--out", "Run directory (checkpoints, logs, resolved config).")]
ConfigOption = Annotated[Path | None, option("--config", "TOML config file (tables per config).")]
SetOption = Annotated[list[str] | None, option("--set", "Override a config value: table.key=value.")]
ResumeOption = Annotated[bool, option("Continue from the newest checkpoint in --out.")]


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (no traceback for bad input)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix (bad options, configs, data, run directories) as one line."""
    from crystals.data import DataError
    from grpo.config import ConfigError
    from grpo.distributed import LaunchError
    from pipeline.config import PipelineError

    try:
        yield
    except (PipelineError, DataError, ConfigError, LaunchError) as err:
        raise fail(str(err)) from None


def configs_with(sections: dict, config: Path | None, overrides: list[str] | None, **options) -> dict:
    """Config tables from --config, then --set, then the command's own options (`table__key=value`; None:
    not given), all checked by the same loader."""
    from pipeline.config import load_configs

    given = [f"{name.replace('__', '.')}={value}" for name, value in options.items() if value is not None]
    # a reward named here drops the file's reward options (they belong to its reward); --set may add some
    fresh = ["reward.options={}"] if options.get("reward__name") else []
    return load_configs(
        sections, config, [*fresh, *(overrides or []), *given], other_tables="sample" in sections
    )


@data_app.command("info")
def data_info(data_dir: DataDirOption = None) -> None:
    """Counts, element coverage and the atom-count histogram of a data directory."""
    from crystals.data import data_summary
    from pipeline.tables import data_summary_tables

    with user_errors():
        summary = data_summary(data_dir)
    console.print(*data_summary_tables(summary))


@app.command()
def check(
    files: Annotated[list[Path], typer.Argument(help="Bulk-text (.txt) or CIF files.")],
    max_atoms: Annotated[int, option("Atom-count limit (paper: 20).")] = 20,
) -> None:
    """Parse structure files and print a validity table; exit 1 if any file is unreadable."""
    from pipeline.runs import check_files
    from pipeline.tables import validity_table

    rows, problems = check_files(files, max_atoms)
    if rows:
        console.print(validity_table(rows, max_atoms))
    for problem in problems:
        err_console.print(escape(problem), soft_wrap=True)
    if problems:
        raise fail(f"{len(problems)} of {len(files)} file(s) could not be read as structures")


@app.command()
def sft(
    out: OutOption,
    model: Annotated[str | None, option("Model path/name, or a size name: tiny, small, base.")] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: ResumeOption = True,
) -> None:
    """Supervised fine-tuning: prompt for a formula -> its ground-truth structure (train split; eval on val)."""
    from pipeline.runs import SFT_SECTIONS, sft_from_configs

    with user_errors():
        configs = configs_with(SFT_SECTIONS, config, set_, run__model=model, run__data_dir=data_dir)
        sft_from_configs(configs, out, resume)


@app.command()
def train(
    out: OutOption,
    model: Annotated[str | None, option("Starting model: a path (e.g. RUN/final_model) or size.")] = None,
    reward: Annotated[str | None, option("Reward: chgnet-etot, ehull, ehull+diversity, module:attr.")] = None,
    generator: Annotated[str | None, option("Rollouts: hf, vllm (in process), vllm-server (worker).")] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: ResumeOption = True,
) -> None:
    """GRPO on prompts for the training split's formulas, rewarded by a crystal reward.

    Sharded on N processes: `torchrun --nproc-per-node N $(which crystal-grpo) train ...` (gloo on CPU)."""
    from pipeline.runs import TRAIN_SECTIONS, train_from_configs

    if generator is not None and generator not in ("hf", "vllm", "vllm-server"):
        raise fail(f"unknown generator {generator!r}; choose hf, vllm or vllm-server")
    with user_errors():
        options = dict(
            run__model=model, run__data_dir=data_dir, reward__name=reward, generator__kind=generator
        )
        train_from_configs(configs_with(TRAIN_SECTIONS, config, set_, **options), out, resume)


@app.command()
def sample(
    model: Annotated[str, option("Model path (e.g. a run's final_model) or hub name.")],
    out: Annotated[Path, option("--out", "JSONL file to write.")],
    split: Annotated[str | None, option("Split whose formulas are prompted (test).")] = None,
    num_formulas: Annotated[int | None, option("How many distinct formulas (20).")] = None,
    samples_per_formula: Annotated[int | None, option("Samples per formula (4).")] = None,
    constraint: Annotated[str | None, option("none, format, elements or formula (formula).")] = None,
    generator: Annotated[str | None, option("hf (default), vllm or vllm-server.")] = None,
    data_dir: DataDirOption = None,
    config: Annotated[Path | None, option("--config", "TOML config, e.g. RUN/config.toml.")] = None,
    set_: SetOption = None,
) -> None:
    """Sample structures for a split's formulas ([sample] table: temperature, max_new_tokens, seed, ...);
    writes JSONL (id, formula, constraint, text, parse status, CIF)."""
    from grpo.generation import GeneratorConfig
    from pipeline.config import RunConfig, SampleConfig
    from pipeline.runs import samples_summary, write_samples

    if out.exists() and out.is_dir():
        raise fail(f"--out {out} is a directory; give a .jsonl file path")
    sections = {"run": RunConfig, "sample": SampleConfig, "generator": GeneratorConfig}
    options = dict(sample__split=split, sample__num_formulas=num_formulas, run__constraint=constraint)
    options |= dict(sample__samples_per_formula=samples_per_formula, generator__kind=generator)
    with user_errors():
        configs = configs_with(sections, config, set_, run__data_dir=data_dir, **options)
        records = write_samples(configs["run"], model, configs["sample"], out, None, configs["generator"])
    summary = samples_summary(records, configs["run"].max_atoms)
    console.print(f"wrote {len(records)} samples to {out}; {summary}", markup=False)


@app.command()
def reward(
    files: Annotated[list[Path], typer.Argument(help="Bulk-text, CIF or samples JSONL files.")],
    reward: Annotated[str, option("Reward name (see --list).")] = "chgnet-etot+species",
    list_: Annotated[bool, option("--list", "List the registered rewards and exit.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Score structure files with any registered reward and print a table."""
    from pipeline.config import RewardConfig
    from pipeline.runs import build_reward_fn, score_files
    from pipeline.tables import reward_table
    from rewards.registry import available_rewards

    if list_:
        for name, description in available_rewards().items():
            console.print(f"[bold]{name}[/bold]: {escape(description)}")
        return
    with user_errors():
        rows = score_files(files, build_reward_fn(RewardConfig(name=reward), data_dir))
    console.print(reward_table(rows))


@app.command()
def evaluate(
    samples: Annotated[list[Path], typer.Argument(help="Samples JSONL files; several -> one comparison.")],
    out: Annotated[Path, option("--out", "Report directory; re-running resumes the relaxations.")],
    relaxer: Annotated[str | None, option("chgnet (default), sevenn or uma (needs a checkpoint).")] = None,
    relaxer_option: Annotated[list[str] | None, option("KEY=VALUE for the relaxer's calculator.")] = None,
    train_data: DataDirOption = None,
    train_limit: Annotated[int | None, option("Novelty against the first N training structures.")] = None,
    workers: Annotated[int | None, option("Relaxation processes (default: one per core).")] = None,
    max_steps: Annotated[int | None, option("Relaxation steps at most (paper: 100).")] = None,
    training_log: Annotated[Path | None, option("A run's train_log.jsonl, for the training curves.")] = None,
    set_: SetOption = None,
) -> None:
    """Relax generated structures ([relax] table: fmax 0.02, timeout_s, ...); write the paper's Tables 1 and 2,
    metrics.json, CSV, CIFs and plots."""
    from pipeline.runs import EVALUATE_SECTIONS, evaluate_from_configs

    missing = [str(p) for p in samples if not p.is_file()]
    if missing:
        raise fail(f"samples file(s) not found: {', '.join(missing)}")
    options = dict(evaluate__relaxer=relaxer, evaluate__train_limit=train_limit, evaluate__workers=workers)
    with user_errors():
        configs = configs_with(EVALUATE_SECTIONS, None, set_, relax__max_steps=max_steps, **options)
        evaluate_from_configs(configs, samples, out, relaxer_option or [], train_data, training_log)
    for name in ("table1.md", "table2.md"):
        console.print((out / name).read_text(), markup=False)  # "[eV/atom]" is text, not a style
    console.print(f"report written to {out}", markup=False)


@app.command()
def demo(
    out: Annotated[Path, option("--out", "Run directory; run again to resume.")] = Path("runs/demo"),
    reward: Annotated[str | None, option("RL reward, as for `train` (e.g. ehull).")] = None,
    data_dir: DataDirOption = None,
    quick: Annotated[bool, option("--quick", "Shrink every stage (about 3 minutes).")] = False,
    config: Annotated[Path | None, option("--config", "Demo config (default: configs/demo.toml).")] = None,
    set_: SetOption = None,
) -> None:
    """The whole pipeline on the packaged data: small model -> SFT -> GRPO -> sample -> relax -> tables."""
    from pipeline.demo import DEMO_SECTIONS, demo_preset, print_demo_report, run_demo

    with user_errors():
        path = demo_preset(quick, config)
        configs = configs_with(DEMO_SECTIONS, path, set_, run__data_dir=data_dir, reward__name=reward)
        stages = run_demo(out, configs)
    print_demo_report(out, stages)


@app.command()
def reproduce(
    out: Annotated[Path, option("--out", "Run directory; run again to continue.")] = Path("runs/reproduce"),
    data_dir: DataDirOption = None,
    arm: Annotated[list[str] | None, option("--arm", "Run (or continue) only this arm (repeatable).")] = None,
    scale: Annotated[str, option("--scale", "cpu (configs/reproduce.toml), tiny or paper.")] = "cpu",
    partial: Annotated[bool, option("--partial", "Report the finished arms; run no other.")] = False,
    set_: SetOption = None,
) -> None:
    """The paper's experiment: SFT, GRPO arms (E_tot, E_hull, diversity; constrained or not), relaxation,
    SevenNet re-score, Tables 1 and 2 with 95 % bootstrap intervals (RUN/report/reproduction.md)."""
    from pipeline.reproduce import load_arms, reproduce, reproduce_preset

    with user_errors():
        given = [f"run.data_dir={data_dir}"] if data_dir is not None else []
        shared, arms = load_arms(reproduce_preset(scale), [*(set_ or []), *given])
        reproduce(out, shared, arms, arm, partial)


@app.command()
def bench(
    names: Annotated[
        list[str] | None, typer.Argument(help="grpo_step, rollout, reward, weight_sync.")
    ] = None,
    quick: Annotated[bool, option("--quick", "Small configurations (about 4 minutes).")] = False,
    out: Annotated[Path, option("--out", "Where results.json and results.md go.")] = Path("bench"),
    threads: Annotated[int | None, option("torch threads (default: one per core).")] = None,
) -> None:
    """Throughput benchmarks, side by side in one run: our GRPO step vs TRL's, HF vs vLLM rollout, rewards,
    weight sync. Writes JSON and a Markdown table with machine info."""
    from benchmarks.run import run_benchmarks
    from pipeline.config import check_run_dir

    with user_errors():
        check_run_dir(out)
        try:
            markdown = run_benchmarks(names, quick, out, threads)
        except ValueError as err:
            raise fail(str(err)) from None
    console.print(markdown.read_text(), markup=False)
    console.print(f"results: {markdown} and {markdown.with_name('results.json')}", markup=False)


if __name__ == "__main__":  # `python cli.py ...`, as under torchrun
    app()
