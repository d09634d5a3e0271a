"""Generation by re-running the whole prefix each step (no KV cache: slow, but simple).

Greedy decoding (temperature 0) picks argmax of the last position's logits, as
`rmoe_generate --temperature 0` does, and stops at max_seq_len like it. Sampling follows
RMoE's SamplingDistribution (temperature, then top-k, then top-p over a stable descending
sort) but draws from torch's generator, not RMoE's mt19937_64: the same seed does NOT give
RMoE's tokens.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .model import RMoEForCausalLM


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int = 0,
                          top_p: float = 1.0) -> torch.Tensor:
    """Next-token probabilities (float64, [V]) from one position's logits."""
    scores = logits.detach().to("cpu", torch.float64).reshape(-1)
    V = scores.numel()
    if temperature <= 0:
        probs = torch.zeros(V, dtype=torch.float64)
        probs[scores.argmax()] = 1.0  # the first maximum on ties, as torch's argmax
        return probs
    probs = torch.softmax(scores / temperature, 0)
    sorted_probs, order = torch.sort(probs, stable=True, descending=True)
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        keep[top_k:] = False
    if top_p < 1.0:
        # Keep a token while the mass strictly before it is below top_p: the smallest prefix
        # reaching top_p, always including the most likely token.
        kept = sorted_probs * keep
        keep &= (torch.cumsum(kept, 0) - kept) < top_p
    out = torch.zeros(V, dtype=torch.float64)
    out[order] = sorted_probs * keep
    return out / out.sum()


@torch.no_grad()
def generate(model: RMoEForCausalLM, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None) -> List[int]:
    """The generated ids (prompt excluded): max_new_tokens of them, capped so that prompt and
    continuation fit in max_seq_len (RMoE's rule)."""
    max_len = model.config.max_seq_len
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must have at least one token (RMoE starts a document "
                         "with the tokenizer's document_separator)")
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's max_seq_len is "
                         f"{max_len}: shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = list(prompt_ids)
    budget = min(max_new_tokens, max_len - len(prompt_ids))
    for _ in range(budget):
        x = torch.tensor([tokens], dtype=torch.long, device=device)
        # RMoE runs the prompt in one pass and then each new token alone (KV cache): only
        # the prompt's tokens ever compete for expert capacity, which capacity_prefix replays.
        logits = model(x, capacity_prefix=len(prompt_ids))
        probs = sampling_distribution(logits[0, -1], temperature, top_k, top_p)
        if temperature <= 0:
            token = int(probs.argmax())
        else:
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
    return tokens[len(prompt_ids):]
