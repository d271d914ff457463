"""One rollout engine on rank 0 serving every rank of a sharded trainer: how vLLM pairs with FSDP here.

Every rank calls `generate` with its own share of the step's prompts; rank 0 gathers them, its engine samples
the whole batch in one call, and each rank gets its own rows back. After an update every rank calls
`load_weights`: the sharded parameters are gathered one tensor at a time (an all-gather each, so no rank holds
more than one full tensor beyond its shards) and rank 0 streams them into the engine.

One engine on rank 0 rather than one per rank, because
  - memory: an engine holds the full weights and a KV cache; one per rank would put a full copy of the model
    on every rank again, the very thing sharding removes;
  - the sync: each gathered tensor goes to one engine, not to N;
  - sampling does not depend on how the batch is split: the engine sees every prompt of the step, each seeded
    by its place in the batch, so a sharded run samples what one process with the same seed would draw from.
The price: rollouts are not spread over the ranks. On GPUs the engine can run on a GPU of its own
(`vllm-server`, weights over NCCL), and the paper's verl run went further with one engine over two GPUs (vLLM
tensor parallelism), which is not built here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grpo.distributed import broadcast_int, gather_objects, scatter_objects
from grpo.generation import Generator, Rollout, SamplingConfig

_DONE = -1  # the index rank 0 announces when the engine has all it asked for


class _Requested:
    """A sharded state dict entry handed to rank 0's engine: asked for its full tensor (`full_tensor()`, as
    grpo.vllm_generator.model_weights does), it first tells the other ranks which entry, so they join the
    all-gather. The engine may read the entries in any order and any number of times."""

    def __init__(self, index: int, tensor):
        self.index, self.tensor = index, tensor
        self.dtype, self.shape = (
            tensor.dtype,
            tensor.shape,
        )  # a DTensor's global ones: planning needs no gather

    def full_tensor(self) -> torch.Tensor:
        broadcast_int(self.index)
        return self.tensor.full_tensor()


class _GatheredOnRequest:
    """What rank 0's engine syncs from: the sharded model's state dict, each DTensor entry a `_Requested`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {
            name: _Requested(i, tensor) if hasattr(tensor, "full_tensor") else tensor
            for i, (name, tensor) in enumerate(self.model.state_dict().items())
        }


def _follow_gathers(model: torch.nn.Module) -> None:
    """A rank other than 0 during a sync: join the all-gather of every entry rank 0 announces, until done."""
    entries = list(model.state_dict().values())
    while (index := broadcast_int(_DONE)) != _DONE:
        entries[index].full_tensor()


class RankZeroGenerator:
    """A `Generator` on every rank of a sharded run whose engine (any generator with `load_weights`, e.g.
    grpo.vllm_generator.VLLMServerGenerator) exists on rank 0 only (the other ranks pass None). Every rank must
    make the same calls in the same order, as the trainer does."""

    def __init__(self, engine: Generator | None):
        self.engine = engine
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        # the trainer sets it on resume; the engine stamps its rollouts with it
        self._version = version
        if self.engine is not None:
            self.engine.weight_version = version

    @property
    def last_sync(self) -> dict[str, float]:
        return getattr(self.engine, "last_sync", {}) if self.engine is not None else {}

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None = None,
    ) -> Rollout:
        """This rank's `n` samples per prompt, drawn on rank 0 together with every other rank's (rank 0's
        `sampling` applies to all)."""
        specs = list(constraints) if constraints is not None else [None] * len(prompts)
        requests = gather_objects([(list(prompts), specs)])  # rank order
        parts = None
        if self.engine is not None:
            all_prompts = [p for rank_prompts, _ in requests for p in rank_prompts]
            all_specs = [s for _, rank_specs in requests for s in rank_specs]
            constrained = any(s is not None for s in all_specs)
            rollout = self.engine.generate(all_prompts, n, sampling, all_specs if constrained else None)
            parts, start = [], 0
            for rank_prompts, _ in requests:  # rows are prompt-major: rank r's prompts are one row range
                end = start + len(rank_prompts) * n
                parts.append(rollout.select(torch.arange(start, end)))
                start = end
        return scatter_objects(parts)

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module, version: int) -> None:
        """The sharded `model`'s current weights into rank 0's engine. Collective: every rank calls it."""
        if self.engine is None:
            _follow_gathers(model)
            self._version = version
            return
        try:
            self.engine.load_weights(_GatheredOnRequest(model), version)
        finally:
            broadcast_int(_DONE)  # also on failure, so the other ranks stop waiting
        self._version = version

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
