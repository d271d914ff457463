"""Per-token log-probabilities of sampled responses under a causal LM.

Prompt (left-padded) and response (right-padded) are concatenated, so real tokens are contiguous only within each
part; position ids are counted over real tokens so a padded row sees the same positions as an unpadded one.
"""

from __future__ import annotations

import torch

from grpo.constraint import TokenMasks
from grpo.distributed import compute_device
from grpo.losses import entropy_from_logits, token_logprobs


def concat_prompt_response(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of the full sequences."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    masks: TokenMasks | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every response position, [N, R] (and the entropy of each next-token distribution).

    ``entropy_grad=False`` computes the entropy without an autograd graph: a value to log, not to train on (its
    softmax over the vocabulary would otherwise be kept for backward, [N, R, vocab] floats, for nothing).

    Logits are divided by the sampling temperature so the log-probabilities are those of the distribution the
    responses were drawn from. They stay in the model's dtype: `token_logprobs` upcasts chunk by chunk, so no
    float32 copy of the whole [N, R, vocab] tensor is made.

    With `masks` (the rollout's constraint masks for these rows) this is the constrained policy the sampler
    drew from: with A_t the tokens allowed at position t,

        log pi_c(y_t) = z_t[y_t] - log sum_{v in A_t} exp z_t[v],    z_t = logits_t / T

    Disallowed logits are set to the dtype's lowest finite value, not -inf, so exp gives exactly 0 and the
    entropy's p * z stays 0 (not 0 * -inf = NaN): no probability mass and no gradient reach a disallowed token.
    A forced position (one allowed token) has log-probability exactly 0 and zero gradient.
    """
    device = compute_device(model)
    input_ids, attention_mask, position_ids = concat_prompt_response(
        prompt_ids, prompt_mask, response_ids, response_mask
    )
    response_len, total_len = response_ids.shape[1], input_ids.shape[1]
    # The logit at position t predicts token t+1, so the response is scored by positions L-R-1 ... L-2 (the last
    # prompt token up to the response's last token but one). Asking the model for exactly those R logits skips
    # the [N, prompt_len, vocab] projection of the prompt and the one after the last token.
    scored = torch.arange(total_len - response_len - 1, total_len - 1, device=device)
    response_logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        logits_to_keep=scored,
    ).logits
    if temperature != 1.0:
        response_logits = response_logits / temperature
    # Where the logits are, which need not be where the weights are kept: an FSDP2 model offloaded to host
    # memory (the reference on a GPU) stores its shards on the CPU and computes on the GPU.
    computed_on = response_logits.device
    if masks is not None:
        allowed = masks.allowed(computed_on)
        response_logits = response_logits.masked_fill(~allowed, torch.finfo(response_logits.dtype).min)
    logprobs = token_logprobs(response_logits, response_ids.to(computed_on))
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(response_logits if entropy_grad else response_logits.detach())
    return logprobs, entropy


@torch.no_grad()
def batched_response_logprobs(
    model, rollout, *, micro_batch_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """`response_logprobs` over a whole rollout in micro-batches, without gradients (old and reference policies)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, rollout.num_samples, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        logprobs, _ = response_logprobs(
            model,
            rollout.prompt_ids[rows],
            rollout.prompt_mask[rows],
            rollout.response_ids[rows],
            rollout.response_mask[rows],
            temperature=temperature,
            masks=rollout.masks.rows(rows) if rollout.masks is not None else None,
        )
        out.append(logprobs.cpu())
    if was_training:
        model.train()
    return torch.cat(out)
