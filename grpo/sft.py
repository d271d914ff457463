"""Supervised fine-tuning on (prompt, response) pairs: maximum likelihood of the response given the prompt.

The paper's SFT arm trains the model to reproduce the ground-truth structure for the prompt's formula; the loss
covers response tokens (and the closing end-of-turn token) only, never the prompt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.config import check_fields
from grpo.distributed import compute_device
from grpo.optim import IndexSampler, LRSchedule, build_adamw, build_scheduler
from grpo.precision import compute_context
from grpo.run_log import RunLogger, step_progress

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    total_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 20
    lr_schedule: LRSchedule = "cosine"
    min_lr_ratio: float = 0.1
    max_length: int = 2048  # prompt + response tokens; longer pairs are dropped (and counted), not truncated
    # Batches of similar length (IndexSampler length groups of this many batches; 0 or 1: plain shuffle):
    # padding to the longest pair of a random batch wastes a third of the compute on crystal text.
    length_group_batches: int = 8
    eval_every: int = 100
    eval_samples: int = 256
    checkpoint_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False  # also write scalars to RUN/tensorboard (needs `pip install tensorboard`)
    seed: int = 0

    def __post_init__(self) -> None:
        # a zero would divide (`step % eval_every`), an empty batch or 0 steps would "finish" doing nothing
        positive = ("total_steps", "batch_size", "max_length", "eval_every", "checkpoint_every", "log_every")
        check_fields(self, ">= 1", lambda v: v >= 1, *positive)
        check_fields(self, "> 0", lambda v: v > 0, "lr", "max_grad_norm")
        # keep_last 0 keeps every checkpoint, eval_samples 0 skips evaluation, length_group_batches 0 shuffles
        nonnegative = ("weight_decay", "warmup_steps", "eval_samples", "keep_last", "length_group_batches")
        check_fields(self, ">= 0", lambda v: v >= 0, *nonnegative)
        check_fields(self, "in [0, 1]", lambda v: 0 <= v <= 1, "min_lr_ratio")


@dataclass
class TokenizedPair:
    input_ids: list[int]
    labels: list[int]


def tokenize_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int
) -> tuple[list[TokenizedPair], int]:
    """Prompt tokens get label IGNORE_INDEX; the response is followed by EOS so the model learns to stop."""
    out, dropped = [], 0
    if not pairs:  # fast tokenizers raise IndexError on an empty batch (e.g. no eval pairs)
        return out, dropped
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    for prompt_ids, response_ids in zip(prompts, responses, strict=True):
        response_ids = response_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(response_ids) > max_length:
            dropped += 1
            continue
        out.append(TokenizedPair(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids))
    return out, dropped


def collate(items: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens and their count."""
    device = compute_device(model)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    labels = batch["labels"].to(device)[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((labels != IGNORE_INDEX).sum())


class SFTTrainer:
    def __init__(
        self,
        *,
        model,
        tokenizer,
        train_pairs: Sequence[tuple[str, str]],
        eval_pairs: Sequence[tuple[str, str]] = (),
        config: SFTConfig,
        run_dir: str | Path,
        console_log: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ):
        """`compute_dtype`: what the forward passes multiply in (bfloat16 over float32 masters: autocast, see
        grpo.precision)."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.run_dir = Path(run_dir)
        self.train_items, dropped = tokenize_pairs(tokenizer, train_pairs, config.max_length)
        self.eval_items, _ = tokenize_pairs(
            tokenizer, list(eval_pairs)[: config.eval_samples], config.max_length
        )
        if dropped:
            log.warning(
                "dropped %d of %d training pairs longer than %d tokens",
                dropped,
                len(train_pairs),
                config.max_length,
            )
        self.dropped = dropped
        if train_pairs and not self.train_items:
            raise ValueError(
                f"all {dropped} training pairs are longer than max_length={config.max_length} tokens"
            )
        self.sampler = IndexSampler(
            len(self.train_items),
            config.seed,
            lengths=[len(item.input_ids) for item in self.train_items],
            group=config.batch_size * config.length_group_batches,
        )
        self.optimizer = build_adamw(model, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.compute = compute_context(model, compute_dtype)
        self.logger = RunLogger(
            self.run_dir / "sft_log.jsonl",
            tensorboard_dir=self.run_dir / "tensorboard" if config.tensorboard else None,
        )
        self.console_log = console_log
        self.step_count = 0

    def save(self) -> Path:
        state = {"sampler": self.sampler.state(), "config": asdict(self.config)}
        return save_checkpoint(
            self.run_dir,
            self.step_count,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=state,
            keep_last=self.config.keep_last,
        )

    def restore(self, checkpoint_path: str | Path) -> None:
        loaded = load_checkpoint(Path(checkpoint_path), optimizer=self.optimizer, scheduler=self.scheduler)
        self.step_count = loaded.step
        self.sampler.load_state(loaded.state["sampler"])
        self.logger.truncate_after(self.step_count)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-token NLL of the responses in the evaluation pairs."""
        if not self.eval_items:
            return float("nan")
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.eval_items), self.config.batch_size):
            batch = collate(
                self.eval_items[start : start + self.config.batch_size], self.tokenizer.pad_token_id
            )
            with self.compute():
                nll, n = response_nll(self.model, batch)
            total, count = total + nll.item(), count + n
        self.model.train()
        return total / max(1, count)

    def step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.train()
        items = [self.train_items[i] for i in self.sampler.take(self.config.batch_size)]
        batch = collate(items, self.tokenizer.pad_token_id)
        with self.compute():
            nll, n = response_nll(self.model, batch)
        loss = nll / max(1, n)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            log.warning("non-finite gradient norm at SFT step %d; update skipped", self.step_count)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step_count += 1
        elapsed = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum())
        return {
            "loss": loss.item(),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
        }

    def train(self, *, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.config
        history = []
        with step_progress("SFT", disable=not progress) as bar:
            task = bar.add_task("sft", total=cfg.total_steps, completed=self.step_count)
            while self.step_count < cfg.total_steps:
                metrics = self.step()
                done = self.step_count == cfg.total_steps
                if self.step_count % cfg.eval_every == 0 or done:
                    metrics["eval_loss"] = self.evaluate()
                if self.step_count % cfg.log_every == 0 or done or "eval_loss" in metrics:
                    keys = ("loss", "eval_loss", "lr") if self.console_log else ()
                    self.logger.log(
                        self.step_count, metrics, console_keys=tuple(k for k in keys if k in metrics)
                    )
                history.append(metrics)
                if self.step_count % cfg.checkpoint_every == 0 or done:
                    self.save()
                bar.update(task, completed=self.step_count)
        return history
