"""grpo/precision.py: fp32 master weights with bf16 compute, and the refusal of bf16 masters at a small lr.

The sharded (FSDP2 MixedPrecisionPolicy) counterpart of the trainer test is in tests/test_fsdp.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.optim import build_adamw
from grpo.precision import PrecisionError, compute_context, resolve_compute_dtype, updatable_fraction
from grpo.sft import SFTConfig, SFTTrainer
from tests.test_sft import PAIRS
from tests.test_trainer import make_trainer
from tests.toy import toy_model, toy_tokenizer

# The paper's fine-tuning rate (A.1), over a few steps: what bf16 masters cannot follow.
STEPS, LR = 5, 1e-6
# bf16 compute rounds each gradient to ~2^-8 of itself; Adam divides by sqrt(v), so where a gradient is near
# zero its update can flip sign. Seen over 5 steps: relative error 0.074, cosine 0.994, 99.7 % equal signs.
MAX_RELATIVE_ERROR = 0.15


def weight_updates(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value - before[name] for name, value in model.state_dict().items()}


def changed_fraction(updates: dict[str, torch.Tensor]) -> float:
    """Share of the weights an update moved at all."""
    return sum(int((u != 0).sum()) for u in updates.values()) / sum(u.numel() for u in updates.values())


def relative_error(updates: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||u - r|| / ||r|| over all weights."""
    diff = sum(float(((updates[k] - r) ** 2).sum()) for k, r in reference.items())
    return (diff / sum(float((r**2).sum()) for r in reference.values())) ** 0.5


# ------------------------------------------------------------------------------ the formula and the refusal


def test_updatable_fraction_follows_the_spacing_of_the_dtype():
    # bf16 at lr 1e-6: a weight moves iff |w| < 2^-11 (half its spacing 2^floor(log2|w|) * 2^-8 <= lr), or w = 0
    weights = torch.tensor([2.0**-12, -(2.0**-12), 2.0**-11, 0.02, 0.0], dtype=torch.bfloat16)
    assert updatable_fraction([weights], 1e-6) == pytest.approx(3 / 5)
    # float32: up to |w| < 32 (16 has half-spacing 2^-20 < 1e-6, 32 has 2^-19 > 1e-6)
    assert updatable_fraction([torch.tensor([0.02, 16.0, 32.0])], 1e-6) == pytest.approx(2 / 3)
    # against brute force: does w +- lr round to another bf16 number?
    w = (0.02 * torch.randn(200_000, generator=torch.Generator().manual_seed(0))).bfloat16()
    moved = ((w.float() + LR).bfloat16() != w) | ((w.float() - LR).bfloat16() != w)
    assert updatable_fraction([w], LR) == pytest.approx(moved.float().mean().item(), abs=1e-3)
    assert updatable_fraction([w], LR) < 0.03  # the 1.9 %


def test_bf16_master_weights_are_refused_at_a_fine_tuning_lr():
    model = toy_model(seed=0)
    build_adamw(copy.deepcopy(model), lr=LR, weight_decay=0.0)  # float32 masters: fine
    with pytest.raises(PrecisionError, match=r"bfloat16 master weights cannot train at lr 1e-06.*float32"):
        build_adamw(copy.deepcopy(model).bfloat16(), lr=LR, weight_decay=0.0)
    # a large rate moves (nearly) every bf16 weight: pure bf16 training from scratch is allowed
    build_adamw(model.bfloat16(), lr=1e-2, weight_decay=0.0)


def test_compute_context_autocasts_only_over_wider_masters():
    tokenizer = toy_tokenizer()
    ids = torch.tensor([tokenizer.encode("count 123")])
    model = toy_model(seed=0)
    with compute_context(model, torch.bfloat16)():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    with compute_context(model, torch.float32)():
        assert model(input_ids=ids).logits.dtype == torch.float32
    assert compute_context(model.bfloat16(), torch.bfloat16)().__class__.__name__ == "nullcontext"


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")],
)
def test_auto_compute_dtype_is_bf16_only_on_a_cpu_that_multiplies_it_natively(
    monkeypatch, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_compute_dtype("auto", "cpu") == expected
    assert [resolve_compute_dtype(name, "cpu") for name in ("float32", "bfloat16")] == ["float32", "bfloat16"]


# ------------------------------------------------------------------------------ the trainers


def test_bf16_compute_over_fp32_masters_trains_at_lr_1e6_like_fp32(tmp_path):
    """5 GRPO steps at lr 1e-6 on a fixed rollout (KL against a bf16 reference): nearly every fp32 master
    weight moves (bf16 masters: ~2 %), the masters and AdamW moments stay fp32, and the updates are the fp32
    run's within bf16 rounding (and really computed in bf16: not identical)."""
    start = toy_model(seed=0)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    updates, trainers = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        trainer = make_trainer(
            tmp_path / name,
            model=copy.deepcopy(start),
            ref_model=copy.deepcopy(start).to(
                dtype
            ),  # the pipeline stores the reference in the compute dtype
            compute_dtype=dtype,
            lr=LR,
            total_steps=STEPS,
            kl_coef=0.001,
        )
        for _ in range(STEPS):
            trainer.step()
        updates[name], trainers[name] = weight_updates(trainer.model, before), trainer
    model = trainers["bf16"].model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = trainers["bf16"].optimizer.state
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in state.values())
    assert changed_fraction(updates["bf16"]) > 0.9
    assert updatable_fraction([p.bfloat16() for p in start.parameters()], LR) < 0.1  # what bf16 masters get
    error = relative_error(updates["bf16"], updates["fp32"])
    assert 1e-4 < error < MAX_RELATIVE_ERROR, error


def test_sft_computes_in_bf16_over_fp32_masters(tmp_path):
    start = toy_model(seed=0)
    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        trainer = SFTTrainer(
            model=copy.deepcopy(start),
            tokenizer=toy_tokenizer(),
            train_pairs=PAIRS,
            config=SFTConfig(batch_size=4, warmup_steps=0, checkpoint_every=100),
            run_dir=tmp_path / name,
            console_log=False,
            compute_dtype=dtype,
        )
        losses[name] = trainer.step()["loss"]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
