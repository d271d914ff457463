"""Constrained decoding, domain-free: a grammar per prompt decides which tokens a response may take next.

A constraint spec is an EBNF grammar in xgrammar's dialect (``root ::= ...``), or None for no constraint.
``GrammarConstraint`` compiles specs for one tokenizer with xgrammar (a token-level pushdown automaton, compiled
once per distinct spec) and gives the tokens allowed after any response prefix. The same masks serve in three
places:

- HF sampling: ``ConstraintLogitsProcessor`` masks the next-token logits of each row (row r of the batch belongs
  to prompt r // n) and records the masks it applied;
- vLLM sampling: the spec goes to vLLM as a per-request structured output (``grammar=``), which vLLM runs
  through the same xgrammar on the same vocabulary; the rollout's masks are then replayed here;
- scoring: ``grpo.policy.response_logprobs`` takes the masked log-softmax with the rollout's masks, so the
  old, new and reference log-probabilities, the ratio, the KL and TIS are those of the policy that sampled.

A ``TokenRule`` narrows a grammar's sets by what a grammar cannot say (a domain's rule that compares the text
with itself); it sees each constrained row's spec and response text so far and applies in all three places
alike (HF sampling and replay; a vLLM engine runs the grammar alone, so a rule needs the HF generator).
``TokenRules`` chains several.

A rollout's masks are a ``TokenMasks``: one packed bitmask per distinct allowed set (bit v of int32 word v // 32
set: token v allowed) and, per position, the index of its set. A grammar has few distinct sets (digits, a
separator, one element symbol...), so this stays small even for a 150k-token vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import LogitsProcessor

BITS = 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 bitmask [..., W] -> bool [..., vocab_size] (True: allowed)."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [..., V] -> packed int32 [..., ceil(V / 32)] (the inverse of ``unpack_bitmask``; bits past V set,
    as xgrammar leaves them: ``unpack_bitmask`` never reads them)."""
    words = (allowed.shape[-1] + BITS - 1) // BITS
    padded = torch.ones((*allowed.shape[:-1], words * BITS), dtype=torch.bool, device=allowed.device)
    padded[..., : allowed.shape[-1]] = allowed
    weights = torch.tensor([1 << b for b in range(BITS)], dtype=torch.int64, device=allowed.device)
    packed = (padded.view(*allowed.shape[:-1], words, BITS).long() * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def _has_bit(bitmask: torch.Tensor, token: int) -> bool:
    """Whether a packed row [W] allows `token`."""
    return bool((int(bitmask[token // BITS]) >> (token % BITS)) & 1)


@dataclass
class TokenMasks:
    """The allowed tokens at every response position of a rollout: row i, position t may take the tokens of
    ``table[index[i, t]]``. ``table[0]`` allows every token: unconstrained rows and padding point there."""

    index: torch.Tensor  # [N, R] long
    table: torch.Tensor  # [U, W] int32, packed
    vocab_size: int

    def rows(self, rows) -> TokenMasks:
        """The masks of some rows (a micro-batch, a rank's share); the table is shared."""
        return TokenMasks(self.index[rows], self.table, self.vocab_size)

    def allowed(self, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [N, R, vocab_size]."""
        table = unpack_bitmask(self.table.to(device), self.vocab_size)
        return table[self.index.to(device)]

    def forced(self) -> torch.Tensor:
        """bool [N, R]: positions where exactly one token is allowed (its log-probability is 0 whatever the
        model, so it carries no gradient and no information)."""
        singles = unpack_bitmask(self.table, self.vocab_size).sum(-1) == 1
        return singles[self.index]


class _MaskTable:
    """Distinct packed masks in order of first appearance; entry 0 allows everything."""

    def __init__(self, words: int):
        self.masks = [torch.full((words,), -1, dtype=torch.int32)]
        self.ids = {self.masks[0].numpy().tobytes(): 0}

    def add(self, mask: torch.Tensor) -> int:
        key = mask.numpy().tobytes()
        if key not in self.ids:
            self.ids[key] = len(self.masks)
            self.masks.append(mask.clone())
        return self.ids[key]

    def tensor(self) -> torch.Tensor:
        return torch.stack(self.masks)


class ConstraintError(RuntimeError):
    """A response the grammar forbids, or a prefix after which it allows no token at all."""


class TokenRule(Protocol):
    """What a grammar cannot state, on top of it: tokens to forbid given a constrained row's spec and its
    response text so far. A pure function of its arguments (sampling and replay must agree); it only removes
    tokens, and when it would remove every candidate it should remove none (an empty set is an error)."""

    def watches(self, text: str, spec: str | None = None) -> bool:
        """Whether the rule may forbid anything after `text` (cheap: called for every row at every step)."""
        ...

    def forbidden(
        self, text: str, candidates: Sequence[int], token_texts: Sequence[str], spec: str | None = None
    ) -> Sequence[int]:
        """The ids among `candidates` (those the grammar allows) to forbid; `token_texts[id]` is a token's
        text."""
        ...


class TokenRules:
    """Several rules as one: each narrows what the ones before it left (so no rule sees a candidate another
    has forbidden, and each keeps its own promise never to empty the set)."""

    def __init__(self, rules: Sequence[TokenRule]):
        self.rules = list(rules)

    def watches(self, text: str, spec: str | None = None) -> bool:
        return any(rule.watches(text, spec) for rule in self.rules)

    def forbidden(
        self, text: str, candidates: Sequence[int], token_texts: Sequence[str], spec: str | None = None
    ) -> list[int]:
        left, forbidden = list(candidates), []
        for rule in self.rules:
            if rule.watches(text, spec):
                removed = set(rule.forbidden(text, left, token_texts, spec))
                forbidden += [token for token in left if token in removed]
                left = [token for token in left if token not in removed]
        return forbidden


class GrammarConstraint:
    """xgrammar matchers for one tokenizer and a vocabulary of ``vocab_size`` logits (the model's output size,
    which may exceed the tokenizer's length; extra ids are never allowed). The end-of-sequence tokens are the
    stop tokens: allowed exactly where the grammar can end. ``rule`` narrows every grammar's sets further."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        rule: TokenRule | None = None,
    ):
        import xgrammar as xgr

        self._xgr = xgr
        if stop_token_ids is None:
            eos = tokenizer.eos_token_id
            stop_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.vocab_size = vocab_size or len(tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.words = (self.vocab_size + BITS - 1) // BITS
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compiled: dict[str, object] = {}
        self.rule = rule
        # each token's text as xgrammar decodes it (byte-level and SentencePiece vocabularies alike)
        self.token_texts = (
            [piece.decode("utf-8", errors="replace") for piece in info.decoded_vocab] if rule else []
        )

    def matcher(self, spec: str):
        """A fresh matcher at the start of a response under grammar `spec`."""
        if spec not in self._compiled:
            self._compiled[spec] = self._compiler.compile_grammar(spec)
        return self._xgr.GrammarMatcher(self._compiled[spec])

    def narrow(self, out: torch.Tensor, row: int, text: str = "", spec: str | None = None) -> None:
        """out[row] (packed), the tokens a grammar's matcher allows next, narrowed by the rule given the row's
        `spec` and its response `text` so far; an empty set is a ConstraintError."""
        if self.rule is not None and self.rule.watches(text, spec):
            words = out[row].numpy().view(np.uint32)  # the row itself: cleared bits clear it in `out`
            bits = np.unpackbits(words.astype("<u4", copy=False).view(np.uint8), bitorder="little")[
                : self.vocab_size
            ]
            candidates = np.flatnonzero(bits).tolist()
            forbidden = np.asarray(
                self.rule.forbidden(text, candidates, self.token_texts, spec), dtype=np.int64
            )
            if forbidden.size:
                np.bitwise_and.at(
                    words, forbidden // BITS, ~(np.uint32(1) << (forbidden % BITS).astype(np.uint32))
                )
        if not bool(out[row].any()):
            raise ConstraintError("the grammar allows no next token (a grammar that cannot be completed)")

    def text_of(self, token: int) -> str:
        """A token's text, as the rule reads it ("" without a rule: nothing reads it)."""
        return self.token_texts[token] if self.rule is not None and token < len(self.token_texts) else ""

    def replay(
        self, specs: Sequence[str | None], response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> TokenMasks:
        """The masks of finished responses (one spec per row): at each masked-in position the set allowed after
        the tokens before it, position by position over the rows as sampling went. ConstraintError when a
        response takes a token its grammar forbids."""
        table = _MaskTable(self.words)
        width = response_ids.shape[1]
        index = [[0] * width for _ in specs]
        rows = [row for row, spec in enumerate(specs) if spec is not None]
        matchers = {row: self.matcher(specs[row]) for row in rows}
        lengths, ids = response_mask.sum(1).tolist(), response_ids.tolist()
        texts = dict.fromkeys(rows, "")
        buffer = torch.zeros((len(specs), self.words), dtype=torch.int32)
        batch = self._xgr.BatchGrammarMatcher()
        for t in range(width):
            live = [row for row in rows if t < lengths[row]]
            if not live:
                break
            batch.batch_fill_next_token_bitmask([matchers[row] for row in live], buffer, live)
            tokens = [ids[row][t] for row in live]
            for row, token in zip(live, tokens, strict=True):
                self.narrow(buffer, row, texts[row], specs[row])
                index[row][t] = table.add(buffer[row])
                if not _has_bit(buffer[row], token):  # the rule's set is the grammar's, narrowed
                    raise _not_allowed(row, t, token)
            accepted = batch.batch_accept_token([matchers[row] for row in live], tokens)
            for row, token, ok in zip(live, tokens, accepted, strict=True):
                if not ok:
                    raise _not_allowed(row, t, token)
                texts[row] += self.text_of(token)
        index_tensor = torch.tensor(index, dtype=torch.long).reshape(response_ids.shape)
        return TokenMasks(index_tensor, table.tensor(), self.vocab_size)


def _not_allowed(row: int, position: int, token: int) -> ConstraintError:
    return ConstraintError(f"row {row}, position {position}: token {token} is not allowed by its grammar")


class ConstraintLogitsProcessor(LogitsProcessor):
    """transformers logits processor: each row's next-token logits outside its grammar set to -inf. Rows
    without a spec, and rows whose grammar has ended (their response is over; generate pads them), are left
    as they are. Keeps every mask it applied (``masks()``) so scoring can use exactly those."""

    def __init__(self, constraint: GrammarConstraint, specs: Sequence[str | None]):
        self.constraint = constraint
        self.specs = list(specs)
        self.matchers = [constraint.matcher(spec) if spec is not None else None for spec in specs]
        self.texts = [""] * len(specs)  # each row's response so far, for the constraint's rule
        self.table = _MaskTable(constraint.words)
        self.steps: list[list[int]] = []  # per step, each row's table index
        self._bitmask = torch.zeros((len(specs), constraint.words), dtype=torch.int32)
        self._batch = constraint._xgr.BatchGrammarMatcher()  # the rows' matchers in one call (and threads)

    def _live(self) -> list[int]:
        """The rows whose grammar has not ended."""
        return [row for row, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        live = self._live()
        if self.steps:  # the tokens sampled at the previous step
            tokens = input_ids[live, -1].tolist()
            accepted = self._batch.batch_accept_token([self.matchers[row] for row in live], tokens)
            if not all(accepted):
                row = live[accepted.index(False)]
                raise ConstraintError(f"row {row}: sampled a token its grammar forbids")
            for row, token in zip(live, tokens, strict=True):
                self.texts[row] += self.constraint.text_of(token)
            live = self._live()
        self._bitmask.fill_(-1)  # rows without a grammar, or past its end, allow everything
        if live:
            self._batch.batch_fill_next_token_bitmask(
                [self.matchers[row] for row in live], self._bitmask, live
            )
        for row in live:
            self.constraint.narrow(self._bitmask, row, self.texts[row], self.specs[row])
        self.steps.append([self.table.add(mask) for mask in self._bitmask])
        self.constraint._xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device))
        return scores

    def masks(self, length: int) -> TokenMasks:
        """The applied masks for responses of `length` tokens (positions past the last step allow all)."""
        index = torch.zeros((len(self.matchers), length), dtype=torch.long)
        if self.steps:
            steps = torch.tensor(self.steps[:length], dtype=torch.long).T
            index[:, : steps.shape[1]] = steps
        return TokenMasks(index, self.table.tensor(), self.constraint.vocab_size)


def min_length_masks(
    rows: int, length: int, min_new_tokens: int, stop_token_ids: Sequence[int], vocab_size: int
) -> TokenMasks:
    """The masks of responses that may not end before ``min_new_tokens`` tokens (a sampler's minimum length):
    every token but the stop tokens at positions below it, every token from there on."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(stop_token_ids)] = False
    no_stop = pack_bitmask(allowed)
    table = _MaskTable(no_stop.shape[-1])
    index = torch.zeros((rows, length), dtype=torch.long)
    index[:, : min(min_new_tokens, length)] = table.add(no_stop)
    return TokenMasks(index, table.tensor(), vocab_size)


def concat_masks(
    parts: Sequence[TokenMasks | None], length: int, rows: Sequence[int] | None = None
) -> TokenMasks:
    """Rows of several TokenMasks (e.g. the chunks of a batched generate) as one, responses padded to
    `length`; the tables are merged. A None part (an unconstrained rollout, `rows[i]` rows) allows everything."""
    reference = next((part for part in parts if part is not None), None)
    if reference is None:
        raise ValueError("no masks to concatenate")
    table = _MaskTable(reference.table.shape[1])
    indices = []
    for i, part in enumerate(parts):
        if part is None:
            indices.append(torch.zeros((rows[i], length), dtype=torch.long))
            continue
        remap = torch.tensor([table.add(mask) for mask in part.table], dtype=torch.long)
        index = torch.zeros((part.index.shape[0], length), dtype=torch.long)
        width = min(length, part.index.shape[1])
        index[:, :width] = remap[part.index[:, :width]]
        indices.append(index)
    return TokenMasks(torch.cat(indices), table.tensor(), reference.vocab_size)
