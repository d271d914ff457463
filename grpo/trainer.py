"""The GRPO loop, top to bottom (Shao et al. 2024; the paper's section 4 and appendix A.1).

One step (`GRPOTrainer.step`, a method per phase):
  1. `_rollout`: take `prompts_per_step` prompts and sample `group_size` responses for each (the generator);
  2. `_score`: score every response with the reward callable;
  3. `_advantages`: A_i = (R_i - mean_group) / (std_group + eps)  (grpo.advantages);
  4. `_logprobs`: old log-probabilities (the sampling policy) and reference log-probabilities (the frozen
     initial model);
  5. `_update`: `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + kl_coef * KL(pi || pi_ref),
     micro-batch gradient accumulation, gradient clipping, AdamW, learning-rate schedule;
  6. `_sync_weights`, `_metrics`: push the new weights to the generator, reduce the metrics over ranks; `train`
     then logs and checkpoints.

The trainer knows nothing of crystals: prompts are texts with metadata, the reward is any
`(metas, completions) -> (rewards, infos)` callable.

Under torchrun with an FSDP-sharded policy (grpo.distributed.setup_sharded) each rank generates and scores its own
share of the step's prompts, and the step's update equals the single-process one on the whole batch (see
grpo/distributed.py for how); metrics are reduced over ranks, and rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from grpo.advantages import AdvantageScale, group_advantages
from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.config import check_fields
from grpo.distributed import (
    compute_device,
    gather_objects,
    gather_rows,
    is_main,
    is_sharded,
    rank,
    reduce_metrics,
    sum_over_ranks,
    world_size,
)
from grpo.generation import Generator, Rollout, SamplingConfig, concat_rollouts, decode_responses
from grpo.losses import (
    AGGREGATIONS,
    AggMode,
    KLKind,
    aggregate,
    kl_penalty,
    masked_mean,
    policy_loss,
    truncated_importance_weights,
)
from grpo.optim import IndexSampler, LRSchedule, build_adamw, build_scheduler
from grpo.policy import batched_response_logprobs, response_logprobs
from grpo.precision import compute_context
from grpo.run_log import RunLogger, step_progress

log = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[dict], Sequence[str]], tuple[list[float], list[dict]]]

# The "penalty" a sample's info carries when its reward raised ("reward_error:TypeError"), written by `_score`
# when the whole reward call fails and by reward wrappers that score sample by sample (rewards.base); an
# "error" key, when present, holds the message.
REWARD_ERROR = "reward_error"


class RewardFailedError(RuntimeError):
    """The reward failed on every sample of `max_failed_reward_steps` steps in a row: the run is learning
    nothing, most likely from a reward that cannot work at all (a wrong function, a missing model)."""


@dataclass
class PromptItem:
    """A prompt ready for the tokenizer (chat template applied), the metadata the reward needs, and optionally a
    constraint on its responses (a grammar spec, see grpo.constraint)."""

    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    constraint: str | None = None


@dataclass
class GRPOConfig:
    # Run length and batch shape. The paper uses 1024 prompts x 5 samples (A.1) and says 8 samples (sec. 4);
    # group_size defaults to 8. The defaults here are scaled for a CPU run.
    total_steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    ppo_epochs: int = 1
    mini_batch_size: int = (
        0  # samples per optimizer step; 0 means the whole step's batch (one update per step)
    )
    micro_batch_size: int = 8  # samples per forward/backward (gradient accumulation inside a mini-batch)
    # Optimizer (A.1: lr 1e-6 for Qwen2.5-7B; small models from scratch need more, see the CLI presets)
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: LRSchedule = "constant"
    min_lr_ratio: float = 0.0
    # Loss (A.1: low-variance KL in the loss with coefficient 0.001, no entropy bonus)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    kl_kind: KLKind = "k3"
    entropy_coef: float = 0.0
    loss_agg: AggMode = "token-mean"
    advantage_scale: AdvantageScale = "group"
    advantage_eps: float = 1e-6
    # Sampling (A.1: responses up to 1024 tokens)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    # No end-of-sequence before this many tokens (0: off); the log-probs are then those of the sampler, which
    # could not stop there. max_new_tokens as well: every response has the same length (a fixed-work benchmark).
    min_new_tokens: int = 0
    # Rollouts older than this many weight updates are refused (0: strictly on-policy)
    max_weight_lag: int = 0
    # Truncated importance sampling: when the generator returns its own log-probs (vLLM), weight each token's
    # policy loss by min(p_trainer / p_sampler, tis_cap) to correct for the engines' numeric mismatch; 0: off
    tis_cap: float = 0.0
    # Dynamic sampling (DAPO; verl's filter_groups): a group whose rewards are all equal has zero advantages and
    # teaches nothing. Drop such groups and sample more prompts to refill the step, in at most
    # `max_sampling_rounds` rounds (then the step trains on what it has). One process only.
    drop_zero_std_groups: bool = False
    max_sampling_rounds: int = 4
    # A reward that fails on every sample of a step (each one a `reward_error` penalty: it raised, e.g. a
    # `module:attr` reward pointed at the wrong function) teaches nothing; after this many such steps in a row
    # the run stops with an error instead of finishing as if it had trained.
    max_failed_reward_steps: int = 3
    # Bookkeeping
    seed: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = False  # also write scalars to RUN/tensorboard (needs `pip install tensorboard`)

    def __post_init__(self) -> None:
        positive = ("total_steps", "prompts_per_step", "ppo_epochs", "micro_batch_size", "max_new_tokens")
        positive += ("checkpoint_every", "log_every", "max_sampling_rounds", "max_failed_reward_steps")
        check_fields(self, ">= 1", lambda v: v >= 1, *positive)
        # a group of one is its own mean: every advantage would be 0 and the run would learn nothing
        check_fields(self, ">= 2", lambda v: v >= 2, "group_size")
        check_fields(self, "> 0", lambda v: v > 0, "lr", "max_grad_norm")
        # greedy groups are identical (zero advantages), and log-probs of logits / 0 are NaN
        check_fields(self, "> 0 (GRPO samples its groups)", lambda v: v > 0, "temperature")
        check_fields(self, "in (0, 1]", lambda v: 0 < v <= 1, "top_p")
        nonnegative = (
            "weight_decay",
            "warmup_steps",
            "kl_coef",
            "advantage_eps",
            "max_weight_lag",
            "keep_last",
        )
        check_fields(self, ">= 0", lambda v: v >= 0, *nonnegative)
        check_fields(self, ">= 0 (0: the whole step's batch)", lambda v: v >= 0, "mini_batch_size")
        check_fields(self, ">= 0 (0: off)", lambda v: v >= 0, "tis_cap")
        check_fields(self, "in [0, 1]", lambda v: 0 <= v <= 1, "min_lr_ratio")
        check_fields(self, "in [0, 1)", lambda v: 0 <= v < 1, "clip_low", "adam_beta1", "adam_beta2")
        check_fields(self, ">= 0", lambda v: v >= 0, "clip_high")


def sanitize_rewards(rewards: Sequence[float]) -> tuple[torch.Tensor, int]:
    """Replace non-finite rewards by the worst finite reward of the batch (never a bonus); count them."""
    values = torch.tensor([float(r) for r in rewards], dtype=torch.float64)
    bad = ~torch.isfinite(values)
    if bad.any():
        worst = values[~bad].min() if (~bad).any() else torch.tensor(0.0, dtype=torch.float64)
        values = torch.where(bad, worst, values)
    return values, int(bad.sum())


def micro_batch_weight(micro_mask: torch.Tensor, mini_mask: torch.Tensor, agg: AggMode) -> float:
    """Share of a mini-batch's loss carried by one micro-batch, so accumulated gradients equal the full batch's:
    the micro-batch's units (tokens or sequences, what its aggregation divides by) over the mini-batch's."""
    normaliser = AGGREGATIONS[agg].normaliser
    return float(normaliser(micro_mask)) / max(1.0, float(normaliser(mini_mask)))


def trainable_tokens(rollout: Rollout) -> torch.Tensor:
    """[N, R] long: the response tokens the loss counts. A token its constraint forced (the only one allowed)
    has log-probability 0 under every policy, hence ratio 1, KL 0, entropy 0 and no gradient; it is left out
    of the loss altogether, so it adds exactly 0 and does not count in any normaliser: not in token-mean's
    token count, not in a sequence's own token count (seq-mean-token-mean), and in the sequence modes a
    response whose tokens were all forced is not a sequence at all (the sum-norm's constant L is unchanged)."""
    if rollout.masks is None:
        return rollout.response_mask
    return rollout.response_mask * (~rollout.masks.forced()).long()


def info_means(infos: Sequence[dict]) -> dict[str, float]:
    """Mean of each numeric value the reward reported in its infos (e.g. energy_per_atom), over the samples
    that report it: what the reward saw, logged next to the reward itself."""
    values: dict[str, list[float]] = {}
    for info in infos:
        for key, value in info.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sorted(values.items())}


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [groups]: groups whose rewards are all equal (their advantages are all 0)."""
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to timings[name]."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class GRPOTrainer:
    def __init__(
        self,
        *,
        model,
        tokenizer,
        generator: Generator,
        prompts: Sequence[PromptItem],
        reward_fn: RewardFn,
        config: GRPOConfig,
        run_dir: str | Path,
        ref_model=None,
        console_log: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ):
        """`compute_dtype`: what the trainer's forward passes (old, reference and update log-probs) multiply in;
        bfloat16 with float32 masters is mixed precision (grpo.precision: autocast in one process, the FSDP
        policy's param_dtype for a sharded model). The generator samples as it is built to."""
        if config.kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model (or set kl_coef = 0)")
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.ref_model = ref_model if config.kl_coef > 0 else None
        self.prompts, self.reward_fn, self.config = list(prompts), reward_fn, config
        self.run_dir = Path(run_dir)
        self.rank, self.world = rank(), world_size()
        if self.world > 1:
            if not is_sharded(model):
                raise ValueError(
                    "a multi-process run trains a sharded policy: call grpo.distributed.setup_sharded"
                )
            if config.prompts_per_step % self.world or config.mini_batch_size % self.world:
                raise ValueError(
                    f"prompts_per_step ({config.prompts_per_step}) and mini_batch_size ({config.mini_batch_size}) "
                    f"must be multiples of the number of ranks ({self.world})"
                )
            if config.drop_zero_std_groups:
                raise ValueError(
                    "drop_zero_std_groups runs in one process only (each rank would refill apart)"
                )
            if hasattr(generator, "synced_gpus"):
                generator.synced_gpus = True  # sharded generate: ranks step together (see HFGenerator)
        self.sampler = IndexSampler(len(self.prompts), config.seed)
        self.step_count = 0
        self.weight_version = 0
        self.failed_reward_steps = 0  # steps in a row on which the reward failed on every sample
        self.last_reward_error: str | None = None  # this rank's last reward failure, for the error message
        self.optimizer = build_adamw(
            model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        self.scheduler = build_scheduler(self.optimizer, config)
        self.compute = compute_context(model, compute_dtype)
        self.logger = RunLogger(
            self.run_dir / "train_log.jsonl",
            tensorboard_dir=self.run_dir / "tensorboard" if config.tensorboard and is_main() else None,
        )
        self.console_log = console_log
        self.sampling = SamplingConfig(
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            seed=config.seed,
        )

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state(),
            "weight_version": self.weight_version,
            "failed_reward_steps": self.failed_reward_steps,
            "config": asdict(self.config),
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step_count,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state(),
            keep_last=self.config.keep_last,
        )

    def restore(self, checkpoint_path: str | Path) -> None:
        """Continue from a checkpoint whose model weights are already loaded into `self.model`."""
        loaded = load_checkpoint(
            Path(checkpoint_path), optimizer=self.optimizer, scheduler=self.scheduler, model=self.model
        )
        self.step_count = loaded.step
        self.weight_version = loaded.state["weight_version"]
        self.failed_reward_steps = loaded.state.get("failed_reward_steps", 0)  # absent: an older checkpoint
        self.generator.weight_version = self.weight_version
        self.sampler.load_state(loaded.state["sampler"])
        if is_main():
            self.logger.truncate_after(self.step_count)

    # -- one step: step() runs the six phases of the module docstring, one method each -------------------------
    def step(self) -> dict[str, Any]:
        """One GRPO step; returns its metrics (with each phase's wall time, the slowest rank's)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        with _timed(timings, "generate"):
            batch, rollout, texts = self._rollout()
        with _timed(timings, "reward"):
            local_rewards, infos = self._score(batch, texts)
        sampling = {"frac_reward_zero_std": self._zero_std_fraction(local_rewards)}
        if self.config.drop_zero_std_groups:
            rollout, local_rewards, infos, refill = self._refill(rollout, local_rewards, infos, timings)
            sampling |= refill
        self.last_reward_error = next(
            (i.get("error") or i["penalty"] for i in infos if str(i.get("penalty")).startswith(REWARD_ERROR)),
            None,
        )
        with _timed(timings, "reward"):
            rewards, nonfinite, advantages = self._advantages(local_rewards)
        with _timed(timings, "logprob"):
            old_logprobs, ref_logprobs = self._logprobs(rollout)
        with _timed(timings, "update"):
            lr = self.scheduler.get_last_lr()[0]  # the rate this update uses (_update steps the scheduler)
            update_metrics = self._update(rollout, advantages, old_logprobs, ref_logprobs)
        with _timed(timings, "sync"):
            self._sync_weights()
        self.step_count += 1
        timings["step"] = time.perf_counter() - start
        metrics = self._metrics(rollout, rewards, nonfinite, infos, lr, update_metrics, timings)
        return {**metrics, **sampling}

    def _rollout(self, sampling_round: int = 0) -> tuple[list[PromptItem], Rollout, list[str]]:
        """1. This rank's share of the step's prompts, `group_size` sampled responses to each (under each
        prompt's constraint), and their texts."""
        cfg = self.config
        # Every rank draws the same indices and takes its own contiguous share, so groups never span ranks.
        share = cfg.prompts_per_step // self.world
        indices = self.sampler.take(cfg.prompts_per_step)[self.rank * share : (self.rank + 1) * share]
        batch = [self.prompts[i] for i in indices]
        # fresh, reproducible samples each step (and refill round) and another stream on each rank
        step_seed = (cfg.seed * 1_000_003 + self.step_count) * cfg.max_sampling_rounds + sampling_round
        self.sampling.seed = step_seed * self.world + self.rank
        constraints = [p.constraint for p in batch]
        if all(spec is None for spec in constraints):
            constraints = None
        rollout = self.generator.generate([p.text for p in batch], cfg.group_size, self.sampling, constraints)
        lag = self.weight_version - rollout.weight_version
        if lag > cfg.max_weight_lag:
            raise RuntimeError(f"rollout is {lag} weight versions old (max_weight_lag={cfg.max_weight_lag})")
        return batch, rollout, decode_responses(self.tokenizer, rollout)

    def _zero_std_fraction(self, local_rewards: list[float]) -> float:
        """Share of the step's groups whose rewards are all equal (over all ranks)."""
        rewards, _ = sanitize_rewards(gather_rows(torch.tensor(local_rewards, dtype=torch.float64)).tolist())
        return zero_std_groups(rewards, self.config.group_size).float().mean().item()

    def _refill(
        self, rollout: Rollout, rewards: list[float], infos: list[dict], timings: dict[str, float]
    ) -> tuple[Rollout, list[float], list[dict], dict[str, float]]:
        """1-2 again, for dynamic sampling: keep the groups with unequal rewards, sample and score more prompts
        until `prompts_per_step` groups are kept or `max_sampling_rounds` rounds are done, and train on the
        kept groups (on the whole first round when none has a signal: its update is then a KL step only)."""
        cfg, n = self.config, self.config.group_size
        first = (rollout, rewards, infos)
        parts: list[tuple[Rollout, list[float], list[dict]]] = []
        kept, dropped, rounds = 0, 0, 1
        while True:
            signal = ~zero_std_groups(sanitize_rewards(rewards)[0], n)
            dropped += int((~signal).sum())
            groups = signal.nonzero().flatten()[: cfg.prompts_per_step - kept]
            if len(groups):
                rows = (groups[:, None] * n + torch.arange(n)).flatten()
                parts.append((rollout.select(rows), [rewards[i] for i in rows], [infos[i] for i in rows]))
                kept += len(groups)
            if kept >= cfg.prompts_per_step or rounds >= cfg.max_sampling_rounds:
                break
            with _timed(timings, "generate"):
                batch, rollout, texts = self._rollout(sampling_round=rounds)
            with _timed(timings, "reward"):
                rewards, infos = self._score(batch, texts)
            rounds += 1
        if parts:
            rollout = concat_rollouts([part for part, _, _ in parts])
            rewards = [r for _, part_rewards, _ in parts for r in part_rewards]
            infos = [i for _, _, part_infos in parts for i in part_infos]
        else:
            rollout, rewards, infos = first
        stats = {
            "dropped_groups": float(dropped),
            "sampling_rounds": float(rounds),
            "kept_groups": float(kept),
        }
        return rollout, rewards, infos, stats

    def _score(self, batch: list[PromptItem], texts: list[str]) -> tuple[list[float], list[dict]]:
        """2. Rewards for every sample (NaN where none); a reward callable that raises (or returns something that
        is not one number per sample) costs this step its signal, not the run."""
        metas = [p.meta for p in batch for _ in range(self.config.group_size)]
        try:
            rewards, infos = self.reward_fn(metas, texts)
            if len(rewards) != len(texts):
                raise ValueError(f"reward returned {len(rewards)} values for {len(texts)} samples")
            rewards = [float(r) for r in rewards]  # None or a string fails here, inside the guard
        except Exception as err:  # noqa: BLE001 - one failing call must not kill a run (a run of them does)
            log.exception("reward function failed on the whole batch; this step gets zero advantages")
            info = {"penalty": f"{REWARD_ERROR}:{type(err).__name__}", "error": str(err)[:500]}
            rewards, infos = [float("nan")] * len(texts), [info] * len(texts)
        return rewards, list(infos)

    def _advantages(self, local_rewards: list[float]) -> tuple[torch.Tensor, int, torch.Tensor]:
        """3. The whole batch's sanitised rewards, how many were not finite, and this rank's rows' advantages.

        The rewards are gathered over ranks (rank order = prompt order), so advantages, the batch std included,
        and the reward metrics are those of a single process.
        """
        cfg = self.config
        all_rewards = gather_rows(torch.tensor(local_rewards, dtype=torch.float64))
        rewards, nonfinite = sanitize_rewards(all_rewards.tolist())
        advantages = group_advantages(
            rewards, cfg.group_size, scale=cfg.advantage_scale, eps=cfg.advantage_eps
        )
        n = len(local_rewards)
        return rewards, nonfinite, advantages[self.rank * n : (self.rank + 1) * n].float()

    def _mini_batch_size(self, rollout: Rollout) -> int:
        """Samples per optimizer step, over all ranks."""
        return self.config.mini_batch_size or rollout.num_samples * self.world

    def _logprobs(self, rollout: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """4. Old log-probs (the sampling policy) and reference log-probs (the frozen initial model), each None
        where the update does not need it."""
        cfg = self.config

        def logprobs(model) -> torch.Tensor:
            with self.compute():
                return batched_response_logprobs(
                    model, rollout, micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature
                )

        # One epoch over one mini-batch is exactly on-policy: the old log-probs equal the current ones at the
        # start of the update, so take them (detached) from the update's own forward pass and skip a pass.
        on_policy = cfg.ppo_epochs == 1 and self._mini_batch_size(rollout) >= rollout.num_samples * self.world
        old_logprobs = None if on_policy else logprobs(self.model)
        ref_logprobs = None if self.ref_model is None else logprobs(self.ref_model)
        return old_logprobs, ref_logprobs

    def _update(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
    ) -> dict[str, float]:
        """5. `ppo_epochs` passes over shuffled mini-batches, one optimizer step each; the metrics over ranks."""
        cfg = self.config
        # each rank's part of a mini-batch is an equal share of its rows
        mini_batch_size = self._mini_batch_size(rollout) // self.world
        self.model.train()
        device = compute_device(self.model)
        max_len = cfg.max_new_tokens
        loss_mask = trainable_tokens(rollout)
        sums: Counter[str] = Counter()
        updates = 0
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.step_count)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rollout.num_samples, generator=generator)
            for mini_start in range(0, rollout.num_samples, mini_batch_size):
                mini = order[mini_start : mini_start + mini_batch_size]
                mini_mask = loss_mask[mini]
                # This rank's share of the mini-batch's loss over all ranks (1 for one process): the sharded
                # gradients are summed over ranks, so the shares make up the whole mini-batch's mean.
                local_norm = float(AGGREGATIONS[cfg.loss_agg].normaliser(mini_mask))
                rank_share = local_norm / max(1.0, sum_over_ranks(local_norm))
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(mini), cfg.micro_batch_size):
                    rows = mini[micro_start : micro_start + cfg.micro_batch_size]
                    mask = loss_mask[rows].to(device)
                    with self.compute():  # the forward only: the loss after it is float32 math (grpo.losses)
                        logprobs, entropy = response_logprobs(
                            self.model,
                            rollout.prompt_ids[rows],
                            rollout.prompt_mask[rows],
                            rollout.response_ids[rows],
                            rollout.response_mask[rows],
                            temperature=cfg.temperature,
                            with_entropy=True,  # logged every step
                            entropy_grad=cfg.entropy_coef != 0,  # a graph only when the loss uses it
                            masks=rollout.masks.rows(rows) if rollout.masks is not None else None,
                        )
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[rows].to(device)
                    tis = None
                    if cfg.tis_cap > 0 and rollout.logprobs is not None:
                        tis = truncated_importance_weights(
                            old, rollout.logprobs[rows].to(device), cfg.tis_cap
                        )
                    loss, metrics = policy_loss(
                        logprobs,
                        old,
                        advantages[rows].to(device),
                        mask,
                        clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high,
                        agg=cfg.loss_agg,
                        max_len=max_len,
                        token_weights=tis,
                    )
                    if ref_logprobs is not None:
                        kl = aggregate(
                            kl_penalty(logprobs, ref_logprobs[rows].to(device), kind=cfg.kl_kind),
                            mask,
                            cfg.loss_agg,
                            max_len,
                        )
                        loss = loss + cfg.kl_coef * kl
                        sums["kl"] += kl.item()
                    if cfg.entropy_coef:
                        loss = loss - cfg.entropy_coef * aggregate(entropy, mask, cfg.loss_agg, max_len)
                    weight = micro_batch_weight(loss_mask[rows], mini_mask, cfg.loss_agg)
                    (loss * (weight * rank_share)).backward()
                    sums["loss"] += loss.item() * weight * rank_share  # adds up to the mini-batch's loss
                    sums["entropy"] += masked_mean(entropy.detach(), mask).item()
                    sums["clip_fraction"] += float(metrics["clip_fraction"])
                    sums["approx_kl"] += float(metrics["approx_kl"])
                    sums["micro_batches"] += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if isinstance(grad_norm, DTensor):  # sharded: the norm over all shards, replicated
                    grad_norm = grad_norm.full_tensor()
                if not torch.isfinite(grad_norm):
                    # A non-finite gradient would poison the weights; skip this update and say so.
                    log.warning("non-finite gradient norm at step %d; update skipped", self.step_count)
                    self.optimizer.zero_grad(set_to_none=True)
                    sums["skipped_updates"] += 1
                else:
                    self.optimizer.step()
                sums["grad_norm"] += float(grad_norm)
                updates += 1
        self.scheduler.step()
        n = max(1, sums.pop("micro_batches"))
        out = {k: sums[k] / n for k in ("entropy", "clip_fraction", "approx_kl", "kl")}
        # mean over mini-batches of the loss each update minimised
        out["loss"] = sums["loss"] / max(1, updates)
        out["grad_norm"] = sums["grad_norm"] / max(1, updates)
        out["skipped_updates"] = sums["skipped_updates"]
        # the ranks' shares of the loss add up to the batch's; the other values are averages over micro-batches
        return {"loss": sum_over_ranks(out.pop("loss")), **reduce_metrics(out)}

    def _sync_weights(self) -> None:
        """6. The updated weights become the generator's: a new weight version, loaded by a generator that
        keeps its own copy (vLLM)."""
        self.weight_version += 1
        self.generator.weight_version = self.weight_version
        sync = getattr(self.generator, "load_weights", None)
        if callable(sync):
            sync(self.model, self.weight_version)

    def _metrics(
        self,
        rollout: Rollout,
        rewards: torch.Tensor,
        nonfinite: int,
        infos: list[dict],
        lr: float,
        update_metrics: dict[str, float],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """6. The step's metrics over all ranks (every rank takes part; train() has rank 0 log them)."""
        timings = reduce_metrics(timings, "max")  # a step lasts as long as its slowest rank
        total_time = timings.pop("step")
        response_lengths = gather_rows(rollout.response_mask.sum(1).float())
        truncated = gather_rows(rollout.truncated.float())
        tokens = sum_over_ranks(float(rollout.prompt_mask.sum() + rollout.response_mask.sum()))
        all_infos = gather_objects(infos)
        penalties = Counter(info.get("penalty") for info in all_infos if info.get("penalty"))
        failed = sum(n for reason, n in penalties.items() if reason.startswith(REWARD_ERROR))
        return {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "reward_min": rewards.min().item(),
            "reward_max": rewards.max().item(),
            "valid_fraction": 1.0 - sum(penalties.values()) / (rollout.num_samples * self.world),
            "failed_reward_fraction": failed / (rollout.num_samples * self.world),  # the reward raised
            "nonfinite_rewards": nonfinite,
            "response_length": response_lengths.mean().item(),
            # share of response tokens the constraint forced (left out of the loss)
            "forced_fraction": 1.0
            - sum_over_ranks(float(trainable_tokens(rollout).sum()))
            / max(1.0, sum_over_ranks(float(rollout.response_mask.sum()))),
            "truncated_fraction": truncated.mean().item(),
            "lr": lr,
            "tokens_per_s": tokens / total_time,
            **update_metrics,
            **{f"time_{k}": v for k, v in timings.items()},
            # a generator that syncs weights reports the last push (ms, bytes): sync_ms, sync_bytes
            **{f"sync_{k}": v for k, v in (getattr(self.generator, "last_sync", None) or {}).items()},
            "time_step": total_time,
            **{f"penalty/{reason}": count for reason, count in sorted(penalties.items())},
            **{f"info/{key}": value for key, value in info_means(all_infos).items()},
        }

    # -- the run ---------------------------------------------------------------------------------------------
    def _count_failed_reward(self, metrics: dict[str, Any]) -> None:
        """Count the steps in a row whose every sample's reward failed (the metrics are the same on every rank,
        so every rank stops together); stop at `max_failed_reward_steps`."""
        failed_all = metrics["failed_reward_fraction"] == 1.0
        self.failed_reward_steps = self.failed_reward_steps + 1 if failed_all else 0
        if self.failed_reward_steps >= self.config.max_failed_reward_steps:
            raise RewardFailedError(
                f"the reward failed on every sample of {self.failed_reward_steps} steps in a row (steps "
                f"{self.step_count - self.failed_reward_steps + 1}-{self.step_count}; "
                f"grpo.max_failed_reward_steps = {self.config.max_failed_reward_steps}), last error: "
                f"{self.last_reward_error}; check the reward"
            )

    def train(self, *, progress: bool = True) -> list[dict[str, Any]]:
        """Run until `total_steps`, checkpointing every `checkpoint_every` steps and at the end. Raises
        RewardFailedError (after logging the step) when the reward failed on every sample of
        `max_failed_reward_steps` steps in a row; the checkpoints before them are kept."""
        cfg = self.config
        history = []
        with step_progress("GRPO", disable=not (progress and is_main())) as bar:
            task = bar.add_task("grpo", total=cfg.total_steps, completed=self.step_count)
            while self.step_count < cfg.total_steps:
                metrics = self.step()
                history.append(metrics)
                last = self.step_count == cfg.total_steps
                if is_main() and (self.step_count % cfg.log_every == 0 or last):
                    keys = (
                        ("reward_mean", "valid_fraction", "kl", "grad_norm", "time_step")
                        if self.console_log
                        else ()
                    )
                    self.logger.log(self.step_count, metrics, console_keys=keys)
                self._count_failed_reward(metrics)
                if self.step_count % cfg.checkpoint_every == 0 or last:
                    self.save()  # every rank takes part in gathering the state; rank 0 writes
                bar.update(task, completed=self.step_count)
        return history
