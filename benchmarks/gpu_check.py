"""The GPU check: the paper's training path on one GPU in under 10 minutes, nothing downloaded.

    bash benchmarks/gpu_check.sh [--steps N] [--out FILE.json]

1. A 0.5B-class Qwen2 built from its config: Qwen2.5-0.5B's decoder (24 layers, hidden 896, 14 query and 2 KV
   heads, MLP 4864) over a 1k-token BPE vocabulary trained on crystal text (benchmarks.common.bench_task), so
   ~0.36B parameters; float32 master weights on the GPU.
2. GRPO steps with bf16 compute (autocast) over the fp32 masters at the paper's lr 1e-6, KL 0.001 against a
   reference stored in bf16, the HF sampler, the crystal prompts and a digit-share reward: the time of every
   step and its phases, and the share of master weights the steps moved (bf16 masters would move ~2 %).
3. vLLM synced with the trainer after the update, colocated in this process and in a worker process: greedy
   continuations of the engine equal the trainer's own greedy decoding (a float32 engine against the float32
   masters: bf16 kernels of two libraries need not break near-ties alike), and sync times. The worker's
   weights go over NCCL when it has a GPU of its own; with a single GPU NCCL cannot connect the two processes
   (it refuses two ranks on one device), so they go through host memory over gloo, and the line says so.

Prints one line per measurement and writes the numbers as JSON (--out). Exit status 0 when every check
passes, 1 when one fails, 2 at once on a machine without CUDA or without vLLM.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

# Qwen2.5-0.5B's decoder (config.json of Qwen/Qwen2.5-0.5B); the vocabulary is the benchmark tokenizer's.
QWEN_05B_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)
LR = 1e-6  # the paper's (A.1)
GREEDY_TOKENS = 24


def unavailable() -> str | None:
    """Why this machine cannot run the check (checked before anything is built), or None."""
    if not torch.cuda.is_available():
        return f"no CUDA device here (torch {torch.__version__}); the GPU check needs one GPU"
    from benchmarks.common import vllm_unavailable

    return vllm_unavailable()


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN_05B_SHAPE,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float()


def report(results: dict, key: str, value, line: str) -> None:
    results[key] = value
    print(line, flush=True)


def grpo_steps(model, task, steps: int, run_dir: Path, results: dict) -> None:
    """`steps` bf16-compute GRPO steps (the first is warm-up) and the share of master weights they moved."""
    from grpo.generation import HFGenerator
    from grpo.trainer import GRPOConfig

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the frozen reference needs no fp32 masters: stored in the compute dtype, as the pipeline stores it
    reference = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    config = GRPOConfig(
        total_steps=steps,
        prompts_per_step=8,
        group_size=4,
        micro_batch_size=16,
        lr=LR,
        kl_coef=0.001,
        max_new_tokens=64,
        checkpoint_every=10_000,
    )
    trainer = task.trainer(
        model, HFGenerator(model, task.tokenizer), config, run_dir, reference, torch.bfloat16
    )
    timings = []
    for step in range(steps):
        metrics = trainer.step()
        phases = {k: round(v, 3) for k, v in metrics.items() if k.startswith("time_")}
        timings.append(phases)
        print(f"grpo step {step + 1}/{steps} (bf16 compute, fp32 masters): {phases}", flush=True)
    results["grpo_steps"] = timings
    moved = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    total = sum(v.numel() for v in before.values())
    masters = {str(p.dtype) for p in model.parameters()}
    report(results, "masters_moved", moved / total, f"master weights moved by the steps: {moved / total:.1%}")
    report(results, "master_dtypes", sorted(masters), f"master dtypes: {sorted(masters)}")
    del reference, trainer
    torch.cuda.empty_cache()


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


def run(steps: int, out: Path | None) -> int:
    from benchmarks.common import bench_task, machine_info
    from grpo.generation import GeneratorConfig
    from grpo.models import count_parameters, save_model
    from grpo.vllm_generator import VLLMGenerator, VLLMServerGenerator

    results: dict = {"machine": machine_info()}
    task = bench_task("tiny")  # its tokenizer and prompts; the model is built here
    model = build_model(task.tokenizer).cuda()
    report(
        results,
        "parameters",
        count_parameters(model),
        f"model: {count_parameters(model) / 1e6:.0f}M parameters",
    )
    passed = True
    with TemporaryDirectory() as tmp:
        start = time.perf_counter()
        grpo_steps(model, task, steps, Path(tmp) / "run", results)
        passed &= results["masters_moved"] > 0.9 and results["master_dtypes"] == ["torch.float32"]
        # float32 engines: their greedy output is compared with the float32 masters'
        config = GeneratorConfig(kind="vllm", dtype="float32", gpu_memory_utilization=0.25)
        # the engines start from the untrained weights: only a working sync gives them the trained ones
        path = save_model(build_model(task.tokenizer), task.tokenizer, Path(tmp) / "engine")
        colocated = VLLMGenerator(path, task.tokenizer, config)
        passed &= greedy_check("colocated", colocated, model, task, results)
        del colocated
        torch.cuda.empty_cache()
        with VLLMServerGenerator(path, task.tokenizer, config, device=model.device) as server:
            report(results, "server_backend", server.backend, f"vLLM worker: weights over {server.backend}")
            passed &= greedy_check("server", server, model, task, results)
        report(results, "total_s", time.perf_counter() - start, f"total {time.perf_counter() - start:.0f} s")
    results["passed"] = passed
    print("gpu check " + ("passed" if passed else "FAILED"), flush=True)
    if out is not None:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps (the first one warms up)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"gpu check: cannot run: {reason}", file=sys.stderr)
        return 2
    return run(args.steps, args.out)


if __name__ == "__main__":
    sys.exit(main())
