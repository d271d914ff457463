"""Rollout: sample `n` completions per prompt.

The trainer talks to a `Generator`, never to a model's `generate` directly, so the Hugging Face sampler here and
a vLLM engine are interchangeable. A `Rollout` holds left-padded prompts and right-padded responses; the response
mask covers every sampled token up to and including the first end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessorList

from grpo.constraint import (
    ConstraintLogitsProcessor,
    GrammarConstraint,
    TokenMasks,
    TokenRule,
    concat_masks,
    min_length_masks,
)
from grpo.distributed import compute_device
from grpo.precision import compute_context


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # no stop token before this many tokens (0: none); the rollout then carries masks without the stop tokens
    # there, so the trainer scores the distribution that sampled. Not with a constraint: its grammar decides
    # where a response may end.
    min_new_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )


@dataclass
class GeneratorConfig:
    """The rollout engine and its settings (a run's `[generator]` table)."""

    # "hf": transformers generate on the policy itself; "vllm": a vLLM engine in this process; "vllm-server":
    # a vLLM worker process, weights broadcast over gloo (CPU) or NCCL (GPU). The vllm ones need the extra;
    # under torchrun either vllm kind is one worker process beside rank 0 (grpo.sharded_rollouts).
    kind: Literal["hf", "vllm", "vllm-server"] = "hf"
    batch_size: int = 64  # hf: sequences per generate() call
    max_prompt_tokens: int = 1024  # longer prompts lose their beginning, never the task at their end
    # vLLM only. dtype "auto": the checkpoint's dtype; "float32" brings vLLM's numerics closest to a float32
    # trainer.
    dtype: str = "auto"
    max_model_len: int | None = None  # prompt + response budget; None: the model's max_position_embeddings
    # no CUDA graphs / torch.compile: a fast start, and nothing to recapture after a sync
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.3  # colocated on a GPU, the trainer needs the rest
    cpu_kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    sleep_mode: bool | None = None  # None: on when CUDA is available (vLLM's CPU worker has no sleep mode)
    # vllm-server: how a sync reaches the worker. "shared_memory": the trainer copies its weights into one
    # flat buffer per dtype that both processes map (allocated once), the worker reloads from views of it;
    # "broadcast": buckets over the private process group (gloo on CPU, NCCL on GPU); "auto": shared memory
    # on CPU (same host, same memory), broadcast on GPU.
    sync_transport: Literal["auto", "shared_memory", "broadcast"] = "auto"
    bucket_mb: float = 64.0  # vllm-server, broadcast: size of one bucket
    worker_timeout_s: float = 600.0  # vllm-server: longest wait for the worker (start, a generate, a sync)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise ValueError("generator.batch_size and generator.max_prompt_tokens must be >= 1")


@dataclass
class Rollout:
    """`n` samples per prompt, laid out prompt-major: rows i*n ... i*n+n-1 belong to prompt i."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 for real prompt tokens
    response_ids: torch.Tensor  # [N, R] right-padded
    response_mask: torch.Tensor  # [N, R] 1 for sampled tokens up to and including EOS
    truncated: torch.Tensor  # [N] bool, True where no EOS was sampled within max_new_tokens
    logprobs: torch.Tensor | None = None  # [N, R] sampler's per-token logprobs, when the generator has them
    weight_version: int = 0  # version of the policy weights that produced the rollout
    masks: TokenMasks | None = None  # the allowed tokens at each position, when sampled under constraints

    @property
    def num_samples(self) -> int:
        return self.response_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout of some rows (e.g. the groups dynamic sampling keeps)."""
        return Rollout(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            response_ids=self.response_ids[rows],
            response_mask=self.response_mask[rows],
            truncated=self.truncated[rows],
            logprobs=self.logprobs[rows] if self.logprobs is not None else None,
            weight_version=self.weight_version,
            masks=self.masks.rows(rows) if self.masks is not None else None,
        )


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int = 0) -> Rollout:
    """The rows of several rollouts as one: prompts left-padded, responses right-padded to common widths
    (padding is masked out, so its token id never matters). Constraint masks are merged (an unconstrained
    part allows everything), and all parts must be from one weight version."""
    if len({part.weight_version for part in parts}) != 1:
        raise ValueError("rollouts of different weight versions cannot be merged")
    p_len = max(part.prompt_ids.shape[1] for part in parts)
    r_len = max(part.response_ids.shape[1] for part in parts)

    def left(x: torch.Tensor, width: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, width: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    with_masks = any(part.masks is not None for part in parts)
    with_logprobs = all(part.logprobs is not None for part in parts)
    return Rollout(
        prompt_ids=torch.cat([left(p.prompt_ids, p_len, pad_token_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, p_len, 0) for p in parts]),
        response_ids=torch.cat([right(p.response_ids, r_len, pad_token_id) for p in parts]),
        response_mask=torch.cat([right(p.response_mask, r_len, 0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        logprobs=torch.cat([right(p.logprobs, r_len, 0.0) for p in parts]) if with_logprobs else None,
        weight_version=parts[0].weight_version,
        masks=concat_masks([p.masks for p in parts], r_len, [p.num_samples for p in parts])
        if with_masks
        else None,
    )


class Generator(Protocol):
    """Anything that samples `n` responses per prompt text, each prompt optionally under its own constraint
    (a grammar spec, see grpo.constraint; None: unconstrained). A constrained rollout carries its masks."""

    weight_version: int

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None = None,
    ) -> Rollout: ...


def output_vocab_size(model) -> int:
    """The number of logits the model scores (its output embedding's rows; may exceed the tokenizer's size)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_min_length(sampling: SamplingConfig, constraints: Sequence[str | None] | None) -> None:
    """A minimum length and a constraint together are refused: the grammar decides where a response may end."""
    if sampling.min_new_tokens and constraints is not None and any(s is not None for s in constraints):
        raise ValueError("min_new_tokens with a constraint: the grammar decides where a response may end")


def length_masks(
    sampling: SamplingConfig, rows: int, length: int, stop_token_ids: Sequence[int], vocab_size: int
) -> TokenMasks | None:
    """The masks a sampler's minimum length imposed on `rows` responses of `length` tokens (None without one)."""
    if not sampling.min_new_tokens:
        return None
    return min_length_masks(rows, length, sampling.min_new_tokens, stop_token_ids, vocab_size)


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask tokens up to and including the first EOS; also return which rows never produced one (truncated)."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_token_ids), device=response_ids.device))
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    mask = (~eos_seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


class HFGenerator:
    """Batched sampling with a transformers causal LM: KV cache, left padding, nucleus sampling, stop at EOS."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 64,
        max_prompt_tokens: int = 1024,
        synced_gpus: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        token_rule: TokenRule | None = None,
    ):
        """`compute_dtype`: what sampling multiplies in (bfloat16 over float32 weights: autocast around the whole
        generate call, grpo.precision), as the trainer's log-prob passes should, so both see one policy.
        `token_rule` narrows every constrained row's grammar (grpo.constraint.TokenRule)."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        # An FSDP-sharded model all-gathers its weights in every forward, so every rank must run the same number
        # of decoding steps: a rank whose samples all ended keeps stepping until every rank is done. The trainer
        # switches this on when it runs on several ranks (each rank must also make the same number of calls).
        self.synced_gpus = synced_gpus
        self.weight_version = 0
        eos = tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self._constraint: GrammarConstraint | None = None
        self.token_rule = token_rule
        self.compute = compute_context(model, compute_dtype)

    def constraint(self) -> GrammarConstraint:
        """The grammar compiler for this tokenizer and model (built on first use)."""
        if self._constraint is None:
            self._constraint = GrammarConstraint(
                self.tokenizer,
                output_vocab_size(self.model),
                stop_token_ids=self.eos_token_ids,
                rule=self.token_rule,
            )
        return self._constraint

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None = None,
    ) -> Rollout:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        # An over-long prompt loses its beginning, never its end (the task and the assistant header).
        tokenizer.truncation_side = "left"
        encoded = tokenizer(
            list(prompts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_prompt_tokens,
            add_special_tokens=False,
        )
        prompt_ids = encoded["input_ids"].repeat_interleave(n, dim=0)
        prompt_mask = encoded["attention_mask"].repeat_interleave(n, dim=0)
        # row r belongs to prompt r // n
        row_specs = [spec for spec in constraints for _ in range(n)] if constraints is not None else None
        constrained = row_specs is not None and any(spec is not None for spec in row_specs)
        check_min_length(sampling, constraints)
        was_training = self.model.training
        self.model.eval()
        device = compute_device(self.model)
        if sampling.temperature > 0:
            mode = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            mode = dict(do_sample=False)  # temperature 0: greedy
        chunks, chunk_masks = [], []
        # transformers fills every setting not passed to generate() from model.generation_config, and a
        # checkpoint's own defaults (Qwen2.5-Instruct: repetition_penalty=1.05, top_k=20, ...) would draw the
        # rollouts from another distribution than softmax(logits / T), the one `response_logprobs` scores.
        # Generating against a blank config leaves exactly the settings passed here.
        model_defaults, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            # A private RNG stream per call keeps sampling reproducible without disturbing the global state.
            with torch.random.fork_rng(devices=[]), self.compute():
                torch.manual_seed(sampling.seed)
                for start in range(0, prompt_ids.shape[0], self.batch_size):
                    ids = prompt_ids[start : start + self.batch_size].to(device)
                    mask = prompt_mask[start : start + self.batch_size].to(device)
                    processors = LogitsProcessorList()
                    if constrained:
                        chunk_specs = row_specs[start : start + self.batch_size]
                        processors.append(ConstraintLogitsProcessor(self.constraint(), chunk_specs))
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        **mode,
                        max_new_tokens=sampling.max_new_tokens,
                        min_new_tokens=sampling.min_new_tokens or None,
                        eos_token_id=self.eos_token_ids,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                        synced_gpus=self.synced_gpus,
                        logits_processor=processors,
                    )
                    chunks.append(out[:, ids.shape[1] :].cpu())
                    if constrained:
                        chunk_masks.append(processors[0].masks(chunks[-1].shape[1]))
        finally:
            self.model.generation_config = model_defaults
            if was_training:
                self.model.train()
        width = max(chunk.shape[1] for chunk in chunks)
        response_ids = torch.cat(
            [
                torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id)
                for c in chunks
            ]
        )
        response_mask, truncated = response_mask_from_eos(response_ids, self.eos_token_ids)
        response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
        if constrained:
            masks = concat_masks(chunk_masks, width)
        else:
            vocab = output_vocab_size(self.model)
            masks = length_masks(sampling, len(response_ids), width, self.eos_token_ids, vocab)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            truncated=truncated,
            weight_version=self.weight_version,
            masks=masks,
        )


def build_generator(
    config: GeneratorConfig,
    model,
    tokenizer,
    weights_dir: str | Path,
    compute_dtype: torch.dtype = torch.float32,
    token_rule: TokenRule | None = None,
) -> Generator:
    """The rollout engine a config names; `compute_dtype` is what the HF generator samples in (the trainer's,
    see grpo.precision; a vLLM engine has its own `dtype`). A vLLM engine starts from the model's current weights, saved once to
    `weights_dir` (so a resumed run samples from the resumed model); the trainer syncs it after every update.
    A worker process's sync group follows the model's device (NCCL from a GPU, see grpo.vllm_generator).

    Sharded (torchrun): one engine on rank 0 serves every rank (grpo.sharded_rollouts), in a worker process
    whichever vLLM kind is asked for: an engine inside a rank would join the trainer's process group.
    Collective then: every rank calls it (the starting weights are gathered to rank 0)."""
    if config.kind == "hf":
        return HFGenerator(
            model,
            tokenizer,
            batch_size=config.batch_size,
            max_prompt_tokens=config.max_prompt_tokens,
            compute_dtype=compute_dtype,
            token_rule=token_rule,
        )
    if token_rule is not None:  # vLLM runs the grammar alone: its samples would break the rule at replay
        raise ValueError(f"a token rule needs the hf generator, not {config.kind}")
    from grpo.distributed import is_main, save_pretrained_full, world_size
    from grpo.models import save_model
    from grpo.vllm_generator import VLLMGenerator, VLLMServerGenerator

    device = compute_device(model)
    if world_size() > 1:
        from grpo.sharded_rollouts import RankZeroGenerator

        path = save_pretrained_full(model, tokenizer, weights_dir)
        return RankZeroGenerator(
            VLLMServerGenerator(path, tokenizer, config, device=device) if is_main() else None
        )
    path = save_model(model, tokenizer, weights_dir)
    if config.kind == "vllm":
        return VLLMGenerator(path, tokenizer, config)
    return VLLMServerGenerator(path, tokenizer, config, device=device)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Decoded response texts, special tokens (EOS, padding) removed."""
    rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
