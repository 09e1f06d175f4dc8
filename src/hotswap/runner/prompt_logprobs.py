"""Prompt logprobs from the prefill's own hidden states: the LM head runs on the scored prompt rows beside
the sampled ones (no extra forward pass), and each row's log_softmax (temperature 1, SGLang's and vLLM's
default for prompt tokens) is reduced to the next prompt token's logprob and the top-k, in slices so a long
chunk never holds more than a slice of float32 [rows, V]."""

from __future__ import annotations

import torch

_SLICE_ROWS = 1024


def score_prompt_rows(logits: torch.Tensor, targets: torch.Tensor, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits [P, V] (model dtype), targets int64 [P] -> (logprob of each target float32 [P],
    top-k logprobs [P, k] and ids, or None when top_k is 0)."""
    values, top_v, top_i = [], [], []
    for at in range(0, logits.shape[0], _SLICE_ROWS):
        lp = torch.log_softmax(logits[at : at + _SLICE_ROWS].float(), dim=-1)
        values.append(lp.gather(1, targets[at : at + _SLICE_ROWS].unsqueeze(1)).squeeze(1))
        if top_k:
            v, i = lp.topk(top_k, dim=-1)
            top_v.append(v)
            top_i.append(i)
    if not values:
        return torch.zeros(0, dtype=torch.float32, device=logits.device), None, None
    return torch.cat(values), torch.cat(top_v) if top_k else None, torch.cat(top_i) if top_k else None
