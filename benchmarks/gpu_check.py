"""The GPU check: the paper's training path on one GPU in minutes, nothing downloaded.

    bash benchmarks/gpu_check.sh [--steps N] [--out FILE.json]

1. A 0.5B-class Qwen2 built from its config: Qwen2.5-0.5B's decoder (24 layers, hidden 896, 14 query and 2 KV
   heads, MLP 4864) over a 1k-token BPE vocabulary trained on crystal text (benchmarks.common.bench_task), so
   ~0.36B parameters; float32 master weights on the GPU. `--shape 3b` builds Qwen2.5-3B's decoder instead.
2. GRPO steps with bf16 compute (autocast) over the fp32 masters at the paper's lr 1e-6, KL 0.001 against a
   reference stored in bf16, the HF sampler, the crystal prompts and a digit-share reward: the time of every
   step and its phases, and the share of master weights the steps moved (bf16 masters would move ~2 %).
3. The same steps from the same initial weights with float32 compute: what bf16 buys per step and per phase.
4. The sharded path on CUDA: the policy FSDP2-sharded under torchrun over NCCL (one rank: NCCL refuses two
   ranks on one GPU), bf16 MixedPrecisionPolicy over fp32 sharded masters, the frozen reference offloaded to
   host memory; GRPO steps, the masters they moved, and the time to gather the full model state.
5. vLLM synced with the trainer after the update, colocated in this process and in a worker process: greedy
   continuations of the engine equal the trainer's own greedy decoding (a float32 engine against the float32
   masters: bf16 kernels of two libraries need not break near-ties alike), and sync times. The worker's
   weights go over NCCL when it has a GPU of its own; with a single GPU they go through host memory over gloo,
   and the line says so. A machine without vLLM skips this part, and the output says so.

Prints one line per measurement and writes the numbers as JSON (--out). Exit status 0 when every check that
ran passes, 1 when one fails, 2 at once on a machine without CUDA. `--device cpu --shape tiny` runs the same
code at a toy size on the CPU (tests/test_benchmarks.py), so the check is known to run before a GPU is lent.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

# hidden size, MLP size, layers, query heads, KV heads; the vocabulary is the benchmark tokenizer's
SHAPES = {
    "0.5b": (896, 4864, 24, 14, 2),  # Qwen2.5-0.5B's decoder (its config.json)
    "3b": (2048, 11008, 36, 16, 2),  # Qwen2.5-3B's: a size where the GPU, not Python, sets the pace
    "tiny": (64, 128, 2, 4, 2),  # the same code at a toy size, for a run on the CPU
}
LR = 1e-6  # the paper's (A.1)
RESPONSE_TOKENS = 64  # every response this long, so that two runs' steps do the same work
GREEDY_TOKENS = 24


def unavailable(device: str) -> str | None:
    """Why this machine cannot run the check on `device` (checked before anything is built), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device here (torch {torch.__version__}); the GPU check needs one GPU"
    return None


def build_model(tokenizer, shape: str, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, mlp, layers, heads, kv_heads = SHAPES[shape]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with device:  # initialized where it runs: a 3B model's init on the host would take minutes
        return Qwen2ForCausalLM(config).float()


def free_memory() -> None:
    """Collect what the previous run left (its optimizer sits in reference cycles) and return it to the GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(results: dict, key: str, value, line: str) -> None:
    results[key] = value
    print(line, flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grpo_config(steps: int):
    from grpo.trainer import GRPOConfig

    return GRPOConfig(
        total_steps=steps,
        prompts_per_step=8,
        group_size=4,
        micro_batch_size=16,
        lr=LR,
        kl_coef=0.001,
        max_new_tokens=RESPONSE_TOKENS,
        min_new_tokens=RESPONSE_TOKENS,
        checkpoint_every=10_000,
    )


def run_steps(trainer, steps: int, label: str) -> list[dict]:
    """Each step's phase times (seconds), printed as they come."""
    timings = []
    for step in range(steps):
        metrics = trainer.step()
        phases = {k: round(v, 3) for k, v in metrics.items() if k.startswith("time_")}
        timings.append(phases)
        print(f"{label} step {step + 1}/{steps}: {phases}", flush=True)
    return timings


def moved_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of the elements of `before` that differ in `after` (the same keys)."""
    moved = sum(int((after[k].to(v.device) != v).sum()) for k, v in before.items())
    return moved / sum(v.numel() for v in before.values())


def grpo_steps(task, args, compute_dtype: torch.dtype, run_dir: Path, results: dict):
    """`args.steps` GRPO steps (the first is warm-up) computing in `compute_dtype` over fp32 masters, from the
    seeded initial weights; the share of master weights they moved. Returns the trained model."""
    from grpo.generation import HFGenerator

    name = dtype_name(compute_dtype)
    model = build_model(task.tokenizer, args.shape, torch.device(args.device))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the frozen reference needs no fp32 masters: stored in the compute dtype, as the pipeline stores it
    reference = copy.deepcopy(model).to(compute_dtype).requires_grad_(False)
    trainer = task.trainer(
        model, HFGenerator(model, task.tokenizer), grpo_config(args.steps), run_dir, reference, compute_dtype
    )
    results[f"grpo_steps_{name}"] = run_steps(trainer, args.steps, f"grpo ({name} compute, fp32 masters)")
    moved = moved_share(before, model.state_dict())
    report(
        results,
        f"masters_moved_{name}",
        moved,
        f"{name} compute: master weights moved by the steps: {moved:.1%}",
    )
    masters = sorted({str(p.dtype) for p in model.parameters()})
    report(results, f"master_dtypes_{name}", masters, f"{name} compute: master dtypes: {masters}")
    return model


def median_phases(timings: list[dict]) -> dict[str, float]:
    """Each phase's median over the steps after the first (warm-up)."""
    counted = timings[1:] or timings
    return {phase: statistics.median(t[phase] for t in counted) for phase in counted[0]}


def bf16_speedup(results: dict) -> None:
    """float32 time over bf16 time (above 1: bf16 is faster) per phase that takes time, from the median of the
    steps after the warm-up."""
    bf16 = median_phases(results["grpo_steps_bfloat16"])
    fp32 = median_phases(results["grpo_steps_float32"])
    ratios = {
        phase.removeprefix("time_"): round(fp32[phase] / bf16[phase], 2)
        for phase in bf16
        if bf16[phase] >= 0.01
    }
    report(results, "bf16_speedup", ratios, f"float32 time / bf16 time, per phase: {ratios}")


def sharded_rank(args) -> int:
    """The torchrun side of `sharded_steps`: one rank, writes its numbers as JSON to `args.out`."""
    import torch.distributed as dist

    from benchmarks.common import bench_task
    from grpo.distributed import full_model_state, setup_sharded, sharding_config
    from grpo.generation import HFGenerator

    on = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if on.type == "cuda":
        torch.cuda.set_device(on)
    dist.init_process_group("nccl" if on.type == "cuda" else "gloo")
    task = bench_task("tiny")
    model = build_model(task.tokenizer, args.shape, on)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    setup_sharded(model, reference, sharding_config(torch.bfloat16), on=on)
    results = {
        "backend": dist.get_backend(),
        "reference_shards_on": str(next(reference.parameters()).to_local().device.type),
    }
    with TemporaryDirectory() as tmp:
        trainer = task.trainer(
            model,
            HFGenerator(model, task.tokenizer),
            grpo_config(args.steps),
            Path(tmp),
            reference,
            torch.bfloat16,
        )
        results["grpo_steps"] = run_steps(
            trainer, args.steps, f"sharded grpo ({results['backend']}, bf16 policy)"
        )
    start = time.perf_counter()
    state = full_model_state(model)
    results["gather_s"] = time.perf_counter() - start
    results["masters_moved"] = moved_share(before, state)
    results["master_dtypes"] = sorted({str(p.to_local().dtype) for p in model.parameters()})
    Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


def sharded_steps(args, results: dict) -> bool:
    """GRPO with the policy FSDP2-sharded (bf16 MixedPrecisionPolicy over fp32 masters, the reference offloaded
    on an accelerator) in a one-rank torchrun launch; whether it trained as it should."""
    with TemporaryDirectory() as tmp:
        out = Path(tmp) / "sharded.json"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        rank = ["-m", "benchmarks.gpu_check", "--sharded-rank", "--out", str(out)]
        options = ["--device", args.device, "--shape", args.shape, "--steps", str(args.steps)]
        done = subprocess.run(launch + rank + options, timeout=300)  # its lines print as they come
        if done.returncode != 0 or not out.exists():
            report(results, "sharded", None, f"sharded run FAILED (exit {done.returncode})")
            return False
        sharded = json.loads(out.read_text())
    results["sharded"] = sharded
    expected = ("nccl", "cpu") if args.device == "cuda" else ("gloo", "cpu")
    print(
        f"sharded: backend {sharded['backend']}, reference shards on {sharded['reference_shards_on']}, "
        f"master weights moved {sharded['masters_moved']:.1%}, master dtypes {sharded['master_dtypes']}, "
        f"full-state gather {sharded['gather_s']:.2f} s",
        flush=True,
    )
    return (
        (sharded["backend"], sharded["reference_shards_on"]) == expected
        and sharded["masters_moved"] > 0.9
        and sharded["master_dtypes"] == ["torch.float32"]
    )


def greedy_check(name: str, engine, model, task, results: dict) -> bool:
    """Sync the engine with `model`, then compare its greedy continuations with the trainer's."""
    from grpo.generation import HFGenerator, SamplingConfig

    engine.load_weights(model, version=1)
    sync = engine.last_sync
    prompts = [p.text for p in task.prompts[:4]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=GREEDY_TOKENS)
    engine_rows = rows(engine.generate(prompts, 1, greedy))
    trainer_rows = rows(HFGenerator(model, task.tokenizer).generate(prompts, 1, greedy))
    same = engine_rows == trainer_rows
    agreeing = sum(
        a == b for x, y in zip(engine_rows, trainer_rows, strict=True) for a, b in zip(x, y, strict=False)
    )
    report(results, f"{name}_sync", sync, f"vLLM {name}: sync {sync}")
    report(
        results,
        f"{name}_greedy_equal",
        same,
        f"vLLM {name}: greedy output equals the trainer's: {same} "
        f"({agreeing}/{sum(len(r) for r in trainer_rows)} tokens agree)",
    )
    return same


def rows(rollout) -> list[list[int]]:
    return [
        ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]


def vllm_checks(model, task, args, work_dir: Path, results: dict) -> bool:
    """Both vLLM engines, started from the untrained weights, synced with the trained `model`."""
    from grpo.generation import GeneratorConfig
    from grpo.models import save_model
    from grpo.vllm_generator import VLLMGenerator, VLLMServerGenerator

    # float32 engines: their greedy output is compared with the float32 masters'
    config = GeneratorConfig(kind="vllm", dtype="float32", gpu_memory_utilization=0.25)
    # the engines start from the untrained weights: only a working sync gives them the trained ones
    untrained = build_model(task.tokenizer, args.shape, torch.device(args.device))
    path = save_model(untrained, task.tokenizer, work_dir / "engine")
    del untrained
    colocated = VLLMGenerator(path, task.tokenizer, config)
    passed = greedy_check("colocated", colocated, model, task, results)
    del colocated
    torch.cuda.empty_cache()
    with VLLMServerGenerator(path, task.tokenizer, config, device=model.device) as server:
        report(results, "server_backend", server.backend, f"vLLM worker: weights over {server.backend}")
        passed &= greedy_check("server", server, model, task, results)
    return passed


def run(args) -> int:
    from benchmarks.common import bench_task, machine_info, vllm_unavailable
    from grpo.models import count_parameters

    results: dict = {"machine": machine_info(), "shape": args.shape, "device": args.device}
    task = bench_task("tiny")  # its tokenizer and prompts; the model is built here
    start = time.perf_counter()
    passed = True
    with TemporaryDirectory() as tmp:
        for compute_dtype in (torch.float32, torch.bfloat16):  # bf16 last: its model is the one vLLM syncs
            model = None  # the previous run's model goes before the next is built
            free_memory()
            model = grpo_steps(task, args, compute_dtype, Path(tmp) / dtype_name(compute_dtype), results)
            name = dtype_name(compute_dtype)
            passed &= results[f"masters_moved_{name}"] > 0.9 and results[f"master_dtypes_{name}"] == [
                "torch.float32"
            ]
        report(
            results,
            "parameters",
            count_parameters(model),
            f"model: {count_parameters(model) / 1e6:.1f}M parameters",
        )
        bf16_speedup(results)
        free_memory()  # for the sharded run's own model
        passed &= sharded_steps(args, results)
        reason = vllm_unavailable() if args.vllm else "not asked for (--no-vllm)"
        if reason is None:
            passed &= vllm_checks(model, task, args, Path(tmp), results)
        else:
            report(results, "vllm", f"not run: {reason}", f"vLLM checks not run: {reason}")
    report(results, "total_s", time.perf_counter() - start, f"total {time.perf_counter() - start:.0f} s")
    results["passed"] = passed
    print("gpu check " + ("passed" if passed else "FAILED"), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first one warms up)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument(
        "--vllm", action=argparse.BooleanOptionalAction, default=True, help="run the vLLM part"
    )
    parser.add_argument("--sharded-rank", action="store_true", help=argparse.SUPPRESS)  # sharded_steps' child
    args = parser.parse_args(argv)
    if args.sharded_rank:
        return sharded_rank(args)
    reason = unavailable(args.device)
    if reason is not None:
        print(f"gpu check: cannot run: {reason}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
