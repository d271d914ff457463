"""Mixed precision as the large-model trainers do it: float32 master weights and optimizer state, bfloat16 compute.

Two dtypes describe a trained model:
  - its storage dtype (the master weights AdamW updates, and the optimizer's moments, which follow them);
  - its compute dtype (what the forward and backward passes multiply in).

In one process the compute dtype is applied by `torch.autocast` around the trainer's forward passes
(`compute_context`); a sharded model computes in the `param_dtype` of its FSDP2 `MixedPrecisionPolicy`
(grpo.distributed.ShardingConfig), which casts the gathered parameters and leaves the sharded masters alone.
Either way the gradients reach the float32 masters in float32, and the loss math upcasts to float32 itself
(grpo.losses).

Master weights stored in bfloat16 do not train at a fine-tuning learning rate: an update smaller than half the
spacing of bfloat16 numbers around a weight rounds away (`updatable_fraction`), so `check_master_weights`
refuses them (the optimizers call it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the names COMPUTE_DTYPES maps, listed once, and "auto" (see resolve_compute_dtype)
ComputeDtype = Literal[(*COMPUTE_DTYPES, "auto")]

# Below this share of its weights that one AdamW step can move, a model does not train (see updatable_fraction).
MIN_UPDATABLE_FRACTION = 0.9


class PrecisionError(ValueError):
    """Master weights in a dtype too coarse for the learning rate (see check_master_weights)."""


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX. Other CPUs emulate it: measured on an AMD EPYC VM with AVX2, a bf16 matmul runs at 1.3 GFLOP/s
    against 90 in float32, so bf16 compute there is tens of times slower, not faster."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # private but long-standing probes of torch's CPU dispatch (there is no public one for these two)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_compute_dtype(name: str, device: torch.device | str) -> str:
    """A compute dtype's name as the trainers take it: "auto" is bfloat16 where `device` has native bf16
    (`native_bfloat16`) and float32 elsewhere; any other name is itself."""
    if name != "auto":
        return name
    return "bfloat16" if native_bfloat16(device) else "float32"


def compute_context(
    model: torch.nn.Module, compute_dtype: torch.dtype
) -> Callable[[], AbstractContextManager]:
    """A factory of the context the trainer's forward passes run in: `torch.autocast(device, compute_dtype)`
    when `compute_dtype` is narrower than the model's stored parameters, else nothing.

    A sharded (FSDP2) model gets nothing either: its MixedPrecisionPolicy already computes in its param_dtype,
    and autocast on top would re-cast what FSDP cast."""
    from torch.distributed.fsdp import FSDPModule  # FSDP pulls in the distributed stack: only when asked

    param = next(model.parameters())
    narrower = torch.finfo(compute_dtype).bits < torch.finfo(param.dtype).bits
    if isinstance(model, FSDPModule) or not narrower:
        return nullcontext
    device_type = param.device.type
    return lambda: torch.autocast(device_type, dtype=compute_dtype)


def updatable_fraction(params: Iterable[torch.Tensor], lr: float) -> float:
    """Share of the elements of `params` that a step of size `lr` changes at all once rounded to their dtype.

    AdamW moves every weight by about lr per step (its update lr * m / (sqrt(v) + eps) has |m / sqrt(v)| ~ 1),
    and a floating-point number w changes only when the step is at least half the spacing of its dtype at w:

        spacing(w) = 2^floor(log2 |w|) * eps(dtype),    updatable  <=>  lr >= spacing(w) / 2

    with eps = 2^-7 for bfloat16 and 2^-23 for float32. At lr 1e-6 a bfloat16 weight moves only when
    |w| < 2^-11 (about 2 % of N(0, 0.02) weights); a float32 one whenever |w| < 32.
    """
    kept = total = 0
    for param in params:
        values = param.detach()
        values = values.to_local() if hasattr(values, "to_local") else values  # a shard of a DTensor
        # frexp: |w| = m * 2^e with m in [0.5, 1), so 2^floor(log2 |w|) = 2^(e - 1), and the condition above is
        # e <= floor(log2(2 lr / eps)) + 1 (a zero weight, e = 0 in frexp, can always move)
        _, exponent = torch.frexp(values)
        largest = math.floor(math.log2(2 * lr / torch.finfo(values.dtype).eps)) + 1
        kept += int(((exponent <= largest) | (values == 0)).sum())
        total += values.numel()
    return kept / max(1, total)


def check_master_weights(model: torch.nn.Module, lr: float) -> None:
    """Refuse (PrecisionError) a model whose trainable weights are stored so coarsely that fewer than
    MIN_UPDATABLE_FRACTION of them can move at learning rate `lr`. Float32 weights are not scanned: at any
    lr above 2^-23 of a weight's magnitude they always can."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return
    fraction = updatable_fraction(params, lr)
    if fraction < MIN_UPDATABLE_FRACTION:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        raise PrecisionError(
            f"{'/'.join(dtypes)} master weights cannot train at lr {lr:g}: an AdamW step changes only "
            f"{fraction:.1%} of them (the rest rounds away). Store the weights in float32 and compute in "
            "bfloat16 instead (fp32 masters, bf16 compute)"
        )
