"""Weight sync: milliseconds per push of the trainer's weights into the vLLM engine, against model size.

For each small model size, a vLLM generator is built from the saved model and ``load_weights`` is timed
``repeats`` times after one warm-up (the weights are perturbed between pushes so nothing can be skipped):
colocated (``VLLMGenerator``: in-place reload by reference) and server mode (``VLLMServerGenerator``: gloo
broadcast in buckets to a worker process). Needs ``grpo.vllm_generator`` and the ``vllm`` extra; without them
the result is a note.

    python -m benchmarks.weight_sync [--quick] [--out FILE.json]
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import bench_task, build_vllm_generator, simple_main, summarize, vllm_unavailable
from grpo.models import MODEL_SIZES, build_small_model, count_parameters, save_model


@dataclass
class SyncBenchConfig:
    sizes: tuple[str, ...] = ("tiny", "small", "base")
    modes: tuple[str, ...] = ("colocated", "server")
    repeats: int = 5


QUICK = SyncBenchConfig(sizes=("tiny",), modes=("colocated",), repeats=2)


def time_sync(generator, model: torch.nn.Module, repeats: int) -> list[float]:
    times = []
    for version in range(repeats + 1):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # a changed weight each time
        generator.load_weights(model, version + 1)
        times.append(generator.last_sync["ms"])
    return times[1:]  # the first push is a warm-up


def run(cfg: SyncBenchConfig | None = None) -> dict:
    cfg = cfg or SyncBenchConfig()
    reason = vllm_unavailable()
    if reason is not None:
        return {"config": asdict(cfg), "rows": [], "note": f"skipped: {reason}"}
    task = bench_task("tiny")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in cfg.sizes:
            model = build_small_model(size, task.tokenizer).float()
            model_dir = save_model(model, task.tokenizer, Path(tmp) / size)
            for mode in cfg.modes:
                try:
                    generator = build_vllm_generator(mode, model_dir, task.tokenizer)
                except Exception as err:  # noqa: BLE001 - one engine failing to start is a row's note
                    failures.append(f"{size} {mode}: {type(err).__name__}: {err}")
                    continue
                try:
                    ms = time_sync(generator, model, cfg.repeats)
                    sent = generator.last_sync["bytes"]
                finally:
                    close = getattr(generator, "close", None)
                    if callable(close):
                        close()
                    del generator
                rows.append(
                    {
                        "size": size,
                        "mode": mode,
                        "parameters": count_parameters(model),
                        "hidden": MODEL_SIZES[size].hidden_size,
                        "mb": sent / 2**20,
                        "ms": summarize(ms),
                        "gb_per_s": sent / 2**30 / (summarize(ms)["median"] / 1e3),
                    }
                )
    note = "; ".join(f"failed to start: {f}" for f in failures)
    return {"config": asdict(cfg), "rows": rows, "note": note}


def print_result(result: dict) -> None:
    if result["note"]:
        print(result["note"])
    for r in result["rows"]:
        print(
            f"{r['size']:6s} {r['mode']:10s} {r['parameters'] / 1e6:6.1f}M params {r['mb']:8.1f} MB "
            f"{r['ms']['median']:8.1f} ms  {r['gb_per_s']:.2f} GB/s"
        )


def main(argv: list[str] | None = None) -> dict:
    return simple_main(__doc__, run, SyncBenchConfig(), QUICK, print_result, argv)


if __name__ == "__main__":
    main()


def markdown(result: dict) -> str:
    lines = ["### Weight sync (trainer -> vLLM)", ""]
    if not result["rows"]:
        return "\n".join(lines + [result["note"]])
    lines += [
        "| model | parameters | MB | mode | ms per sync | GB/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['mb']:.0f} | {r['mode']} | "
            f"{r['ms']['median']:.1f} | {r['gb_per_s']:.2f} |"
        )
    return "\n".join(lines + (["", result["note"]] if result["note"] else []))
