"""A toy task shared by the grpo tests: a ~300-token BPE tokenizer, the "tiny" Qwen2 model and a digit reward.

Everything here is deterministic (same arguments -> same tokenizer, weights and prompts), so a test and a
subprocess worker (tests/resume_worker.py) that call the same functions build the same run.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from grpo.models import build_small_model, train_bpe_tokenizer
from grpo.trainer import PromptItem

WORDS = ("count", "write", "list", "some", "numbers", "letters", "please", "quickly", "now", "more")


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Prompt-like sentences and mixed digit/letter strings, so the merges cover both."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
        texts.append(f"{words} {digits} {rng.choice(WORDS)}")
    return texts


@functools.cache
def toy_tokenizer(vocab_size: int = 300):
    """ChatML byte-level BPE (eos <|im_end|>, pad <|endoftext|>, left padding). Cached: treat it as read-only."""
    return train_bpe_tokenizer(_corpus(), vocab_size=vocab_size)


def toy_model(seed: int = 0, tokenizer=None):
    """A fresh float32 "tiny" Qwen2 (~6M parameters with this vocabulary)."""
    return build_small_model("tiny", tokenizer or toy_tokenizer(), seed=seed, max_position_embeddings=128)


def toy_prompts(n: int = 8, tokenizer=None) -> list[PromptItem]:
    """`n` distinct chat prompts with the generation header appended; meta carries the prompt index."""
    tokenizer = tokenizer or toy_tokenizer()
    items = []
    for i in range(n):
        words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        messages = [{"role": "user", "content": f"{words} {i}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        items.append(PromptItem(text=text, meta={"index": i}))
    return items


def digit_fraction(text: str) -> float:
    """Share of the characters of `text` that are ASCII digits (0 for an empty text)."""
    return sum(c in "0123456789" for c in text) / len(text) if text else 0.0


def digit_reward(metas: Sequence[dict], texts: Sequence[str]) -> tuple[list[float], list[dict]]:
    """The trainer's reward callable: digit fraction of each completion, no penalties."""
    return [digit_fraction(t) for t in texts], [{} for _ in texts]
