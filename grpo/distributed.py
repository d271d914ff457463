"""Process group and FSDP2 plumbing: one trainer process per device, the policy sharded with `fully_shard`.

Launch: `torchrun --nproc-per-node N -m MODULE ...` (gloo on CPU, NCCL on CUDA). Without torchrun's environment
every helper here is a no-op for a single process, so the trainer runs the same code either way.

How a sharded GRPO step equals a single-process step on the same batch:
  - every rank draws the same prompt indices and takes its own contiguous slice, so groups never span ranks;
  - rewards are gathered, so advantages (and the reward metrics) are computed on the whole batch;
  - each rank weighs its micro-batch losses by its share of the GLOBAL normaliser (token or sequence count summed
    over ranks), and FSDP sums (not averages) the gradients over ranks (`shard_model` sets divide factor 1).

Loading (`load_sharded`): every rank builds the model on the meta device and shards it, and rank 0 streams the
checkpoint in tensor by tensor, so no rank ever holds the whole model (not even rank 0). Mixed precision: the
sharded masters stay float32, a bf16 `ShardingConfig.param_dtype` computes in bf16 (`sharding_config`).

Accelerate 1.15 does not shard with FSDP on CPU (it trains an unsharded copy on every process without a word), so
`init_distributed` refuses that launch; on GPUs `accelerate launch --config_file configs/accelerate_fsdp2.yaml`
works as a launcher and its FSDP settings (offload, mixed precision) are read by `settings_from_accelerate_env`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from grpo.models import Dtype, SafetensorsCheckpoint, empty_model_and_tokenizer, local_checkpoint, save_model

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ShardingConfig:
    # Mixed precision: parameters all-gathered (and the forward run) in `param_dtype`, gradients reduced in
    # `reduce_dtype`; None keeps the stored dtype. The sharded master weights and the optimizer stay as loaded
    # (float32 for training: see grpo.precision).
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    # Keep the policy's shards in host memory between uses (CPUOffloadPolicy; accelerators only). The frozen
    # reference model is always offloaded on an accelerator, as in the paper.
    offload_policy: bool = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def device() -> torch.device:
    """This process's device: its CUDA device under torchrun on GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s forward runs, so where its inputs and everything combined with its outputs belong: where
    its parameters are, except for an FSDP2 model offloaded to host memory (CPUOffloadPolicy: the reference on
    an accelerator, the policy with `fsdp_offload_params`), whose shards sit on the CPU while it computes on
    its mesh's accelerator, this process's (FSDP moves the forward's inputs there, nothing else)."""
    param = next(model.parameters())
    mesh = getattr(param, "device_mesh", None)  # FSDP2's shards are DTensors on a device mesh
    if mesh is not None and mesh.device_type != param.device.type:
        return device()
    return param.device


def resolve_device(spec: str) -> torch.device:
    """The device a `run.device` setting names: "auto" (this process's GPU when there is one, else the CPU),
    "cpu", "cuda" (this process's GPU: LOCAL_RANK under torchrun) or "cuda:N" (one process only). ValueError,
    with what is available, for a device this machine does not have."""
    spec = spec.strip().lower()
    if spec == "auto":
        return device()
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {spec!r}: this machine has no CUDA device (use device=cpu or auto)")
    if index and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would take the same GPU (and NCCL refuses two ranks on one device)
        raise ValueError(
            f"device {spec!r}: under torchrun each rank uses its own GPU; use device=cuda or auto"
        )
    chosen = int(index) if index else int(os.environ.get("LOCAL_RANK", 0))
    if chosen >= count:
        raise ValueError(f"device {spec!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", chosen)


class LaunchError(RuntimeError):
    """A launch this module cannot run as asked (see check_launcher)."""


def check_launcher() -> None:
    """Fail loudly on `accelerate launch` with FSDP on a machine without GPUs: Accelerate 1.15 would train an
    unsharded model on every process there."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if fsdp and (cpu or not torch.cuda.is_available()):
        raise LaunchError(
            "accelerate launch with FSDP on CPU does not shard (Accelerate 1.15 silently trains a full copy per "
            "process). Launch CPU runs with torchrun instead: "
            "torchrun --nproc-per-node 2 -m MODULE ... (gloo backend, sharded by grpo.distributed)"
        )


def init_distributed(timeout_s: float = 1800.0, on: torch.device | None = None) -> bool:
    """Join the process group that torchrun (or accelerate launch) describes in RANK/WORLD_SIZE/MASTER_ADDR;
    returns whether this is a multi-process run. NCCL when the ranks train on CUDA (`on`, default: this
    process's device), gloo on the CPU; no-op for a single process."""
    check_launcher()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if (on or device()).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (torch warns at exit about one left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(timeout_s: float = 1800.0, on: torch.device | None = None) -> Iterator[bool]:
    """`init_distributed` for the span of a block (yields whether the run is multi-process); leaves the group
    torchrun asked for at the end (an in-process vLLM engine makes and removes its own)."""
    sharded = init_distributed(timeout_s, on)
    try:
        yield sharded
    finally:
        if sharded:
            shutdown()


def settings_from_accelerate_env() -> ShardingConfig:
    """The sharding settings of an `accelerate launch --config_file ...` run (its mixed_precision and
    fsdp_offload_params, passed to the processes as environment variables); defaults under torchrun."""
    precision = _DTYPES.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    return ShardingConfig(
        param_dtype=precision,
        # gradients are summed in float32 even when the forward runs in bf16: bf16 sums lose low-order bits
        reduce_dtype=torch.float32 if precision is not None else None,
        offload_policy=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
    )


def sharding_config(compute_dtype: torch.dtype) -> ShardingConfig:
    """The sharding settings of a run that computes in `compute_dtype`: the launch's (an accelerate launch's
    mixed precision and offload), with bf16 mixed precision when `compute_dtype` is bfloat16: parameters
    gathered and used in bf16, gradients reduced into the float32 masters in float32."""
    launch = settings_from_accelerate_env()
    if compute_dtype == torch.float32:
        return launch
    return dataclasses.replace(launch, param_dtype=compute_dtype, reduce_dtype=torch.float32)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers model, in order: the outermost submodules whose class is named in
    the model's `_no_split_modules` (the blocks transformers and Accelerate never cut apart, e.g.
    Qwen2DecoderLayer under model.layers, GPT2Block under transformer.h). ValueError when there are none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()  # ids of the modules within a block already taken
    for module in model.modules():  # depth first, parents before children: the outermost match comes first
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if not blocks:
        raise ValueError(
            f"{type(model).__name__}: no decoder blocks found (its _no_split_modules is {sorted(names)})"
        )
    return blocks


def _offloaded(config: ShardingConfig, frozen: bool, on: torch.device) -> bool:
    # CPUOffloadPolicy needs an accelerator to copy to; on CPU the shards already live in host memory.
    return on.type != "cpu" and (frozen or config.offload_policy)


def shard_model(
    model: torch.nn.Module,
    config: ShardingConfig | None = None,
    *,
    frozen: bool = False,
    on: torch.device | None = None,
):
    """FSDP2-shard a transformers causal LM in place: each decoder block (`decoder_layers`) is one unit (its
    parameters all-gathered just for its forward/backward), the rest (embeddings, tied lm_head, final norm)
    is the root unit. Every parameter becomes a DTensor holding 1/world_size of dim 0 on this rank, on `on`
    (default: this process's device). A model on the meta device stays there (see `load_sharded`).

    Gradients are summed over ranks (divide factor 1, not FSDP's default mean): the trainer already weighs each
    rank's loss by its share of the global batch. `frozen` (the reference model) skips that and, on an
    accelerator, offloads the shards to host memory. Returns the model (its class becomes FSDP<Class>).
    """
    config = config or ShardingConfig()
    on = on or device()
    kwargs: dict[str, Any] = {
        # the mesh's device type decides where the shards live (fully_shard's default is the accelerator
        # whenever there is one, even for a run told to train on the CPU)
        "mesh": init_device_mesh(on.type, (world_size(),)),
        "mp_policy": MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype),
    }
    if _offloaded(config, frozen, on):
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # fully_shard moves the shards to this rank's device itself (or keeps them on the host with offload)
    units = [*decoder_layers(model), model]
    for unit in units:
        fully_shard(unit, **kwargs)
    if frozen:
        model.requires_grad_(False)
    else:
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


# -- collectives on small host values (identity for a single process) ----------------------------------------
def _comm_device() -> torch.device:
    return device() if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return float(total.item())


def reduce_metrics(values: dict[str, float], op: str = "mean") -> dict[str, float]:
    """Mean (or max) of each value over ranks; every rank must pass the same keys in the same order."""
    if world_size() == 1 or not values:
        return dict(values)
    stacked = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        stacked /= world_size()
    return dict(zip(values, stacked.cpu().tolist(), strict=True))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 in rank order (equal shapes on all ranks)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor, device=_comm_device()) for _ in range(world_size())]
    dist.all_gather(parts, tensor.to(_comm_device()))
    return torch.cat(parts).to(tensor.device)


def gather_objects(items: list) -> list:
    """Concatenate every rank's list of picklable objects in rank order."""
    if world_size() == 1:
        return list(items)
    parts: list[list] = [[] for _ in range(world_size())]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; identity for a single process)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_int(value: int) -> int:
    """Rank 0's integer on every rank: one small tensor broadcast, for a signal sent many times."""
    if world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(box, src=0)
    return int(box.item())


def scatter_objects(items: list | None) -> Any:
    """Rank r's item of rank 0's list of one picklable item per rank (others pass None)."""
    if world_size() == 1:
        return items[0]
    out = [None]
    dist.scatter_object_list(out, items if is_main() else None, src=0)
    return out[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# -- full state dicts: gathered to rank 0 on the CPU, loaded by broadcast from rank 0 ---------------------------
def _full(broadcast: bool = False) -> StateDictOptions:
    # Gather: cpu_offload moves each gathered tensor to host memory as it arrives and keeps it on rank 0 only, so
    # no rank holds a second full copy on its device. Load: rank 0 broadcasts tensor by tensor, every rank keeps
    # its own shard of each.
    if broadcast:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 ({} on other ranks); a plain model's own state dict.
    Collective: every rank must call it."""
    return get_model_state_dict(model, options=_full()) if is_sharded(model) else model.state_dict()


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` of the whole model, in torch's own format (parameters numbered in param-group
    order), so the file is the same whether a run was sharded or not. Sharded: gathered to rank 0 ({} on the
    others); collective, every rank must call it."""
    if not is_sharded(model):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_full())
    if not by_name:
        return {}
    number = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    return {
        "state": {number[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of `optimizer_state`. Sharded: `state` is read on rank 0 (the others pass {}) and broadcast,
    each rank keeping its shards."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    if state:
        name_of = {id(p): n for n, p in model.named_parameters()}
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(model, optimizer, state, options=_full(broadcast=True))


def load_full_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load whole tensors read on rank 0 (the other ranks pass {}) into a sharded (or plain) model, one
    parameter at a time: rank 0 broadcasts the full tensor, each rank keeps its own shard of it. No rank holds
    more than its shards plus one full tensor, so `state` can be a checkpoint read lazily tensor by tensor.

    A parameter is looked up under each of its names (a tied embedding is saved under one, either one); a
    tensor is cast to the parameter's dtype. Buffers stay as the model built them (a causal LM's are
    computed from its config). Collective; ValueError on every rank when the state lacks a parameter."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    missing = (
        [names[0] for names in aliases.values() if not any(n in state for n in names)] if is_main() else []
    )
    missing = broadcast_object(missing)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    # One receive buffer per dtype, as large as the largest parameter, reused for every tensor: a fresh buffer
    # per tensor would leave the allocator holding freed ones of every size (seen: +20 % of the model in RSS).
    largest: dict[torch.dtype, int] = {}
    for param in params.values():
        largest[param.dtype] = max(largest.get(param.dtype, 0), param.numel())
    buffers = {
        dtype: torch.empty(numel, dtype=dtype, device=_comm_device()) for dtype, numel in largest.items()
    }
    for key, names in aliases.items():
        param = params[key]
        full = buffers[param.dtype][: param.numel()].view(param.shape)
        if is_main():
            full.copy_(state[next(n for n in names if n in state)])
        if world_size() > 1:
            dist.broadcast(full, src=0)
        with torch.no_grad():
            if isinstance(param, DTensor):
                # this rank's slice of the full tensor, cut locally (src_data_rank=None: no communication)
                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(full)


def load_sharded(
    source: str | Path,
    *,
    dtype: Dtype,
    config: ShardingConfig | None = None,
    frozen: bool = False,
    gradient_checkpointing: bool = False,
    on: torch.device | None = None,
):
    """(model, tokenizer) of a safetensors checkpoint (directory or hub name), FSDP2-sharded as it loads so no
    rank ever holds the whole model: every rank builds the model on the meta device (no memory), shards it
    (`shard_model`), allocates only its own shards, and then rank 0 reads the checkpoint tensor by tensor and
    broadcasts each (`load_full_model_state`). Host memory per rank: its shards plus one full tensor (rank 0
    also reads one tensor at a time). Collective: every rank calls it with the same arguments."""
    on = on or device()
    path = broadcast_object(local_checkpoint(source) if is_main() else None)  # a hub name is fetched once
    model, tokenizer = empty_model_and_tokenizer(
        path, dtype=dtype, gradient_checkpointing=gradient_checkpointing
    )
    # the buffers (rotary frequencies) are real already; to_empty below would replace them by garbage
    buffers = {
        (id(module), name): buffer
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    }
    config = config or ShardingConfig()
    shard_model(model, config, frozen=frozen, on=on)
    model.to_empty(device="cpu" if _offloaded(config, frozen, on) else on)
    for module in model.modules():
        for name in list(module._buffers):
            if (id(module), name) in buffers:
                module._buffers[name] = buffers[id(module), name].to(on)
    load_full_model_state(model, SafetensorsCheckpoint(path) if is_main() else {})
    return model, tokenizer


def save_pretrained_full(model, tokenizer, path: str | Path) -> Path:
    """`grpo.models.save_model` (atomic) of a sharded or plain model: gathered to rank 0, written there only.
    Collective: every rank must call it; the directory is complete on return on every rank."""
    state = full_model_state(model)
    path = Path(path)
    if is_main():
        save_model(model, tokenizer, path, state_dict=state)
    barrier()
    return path


def setup_sharded(
    model, ref_model=None, config: ShardingConfig | None = None, on: torch.device | None = None
):
    """Shard a policy and its frozen reference already loaded on every rank (`config` defaults to the
    accelerate launch settings, or none); `load_sharded` instead shards a checkpoint as it loads. The trainer
    reads the rank and world size from the process group. Returns (model, ref_model)."""
    config = config or settings_from_accelerate_env()
    shard_model(model, config, on=on)
    if ref_model is not None:
        shard_model(ref_model, config, frozen=True, on=on)
    return model, ref_model
