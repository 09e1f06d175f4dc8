"""Penalties and biases on the logits, on the device, before temperature and filters. Each request follows
one engine's rule (`SamplingParams.vllm_penalty_rule`, set only by vLLM's token route, server/vllm_api.py):
- SGLang's (every other path): frequency and presence penalties (additive), then repetition_penalty over the
  output tokens only (multiplicative), then logit_bias (SGLang: penaltylib/repetition_penalty.py cumulates output
  tokens only; orchestrator.py's additive-then-scaling accumulation; sampling_batch_info.py adds logit_bias last);
- vLLM's: logit_bias, then repetition_penalty over the prompt and output tokens, then frequency and presence
  (v1/sample/sampler.py: logits processors, logit_bias among them, before `apply_penalties`).
The min_new_tokens mask (eos and stop ids at -inf while too few tokens are out) comes last: -inf stays -inf.

Only the rows that use one pay anything. No [B, V] count buffer is kept: each step the rows' (row, id)
pairs are written straight into the logits, so the work is proportional to the tokens of penalized rows,
not to B x V, and nothing waits on the device (`torch.unique` would: its output size is data-dependent,
a host sync every step). A repeated pair writes the same value again (repetition), or accumulates
(frequency: once per occurrence; presence: only at its first occurrence in the sorted keys). The token
still in flight (sampled by the previous step, not yet read back) is read on the device through `prev_row`.
Rows with penalties run eagerly (outside the decode CUDA graphs, whose sampler reads the raw logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hotswap.runner.batch_entry import BatchEntry


def _flat(lists: list) -> tuple[np.ndarray, np.ndarray]:
    """(row of each id, the ids) of several id lists (int64 arrays, as the batcher keeps them, or lists), as
    int64 arrays."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, dtype=np.int64)
    return np.repeat(np.arange(len(lists), dtype=np.int64), lengths), ids


def _sorted_pairs(rows: torch.Tensor, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, ids) sorted by pair, and whether each is its pair's first occurrence (no host sync)."""
    keys = torch.sort(rows * vocab + ids).values
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys // vocab, keys % vocab, first


def apply_penalties(logits: torch.Tensor, entries: list[BatchEntry], prev_token_ids: torch.Tensor | None,
                    to_device) -> torch.Tensor:
    """float32 [B, V]: `logits` (one row per entry) with each row's penalties and biases applied, in its rule's
    order (the two rules' rows are disjoint, so one rule's steps commute with the other's).
    `to_device`: numpy array -> tensor on the logits' device."""
    x = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    pen = [i for i, e in enumerate(entries) if e.row.penalized]
    vllm = [i for i in pen if entries[i].params.vllm_penalty_rule]
    sglang = [i for i in pen if not entries[i].params.vllm_penalty_rule]
    _add_bias(x, entries, vllm, to_device)
    _penalize(x, entries, sglang, prev_token_ids, to_device, vllm_rule=False)
    _penalize(x, entries, vllm, prev_token_ids, to_device, vllm_rule=True)
    _add_bias(x, entries, sglang, to_device)
    banned = [i for i in pen if entries[i].banned_ids]
    if banned:  # each request's list is made once (the batcher keeps it on the sequence): flattened here in numpy
        rows, ids = _flat([entries[i].banned_ids for i in banned])
        x[to_device(np.asarray(np.take(banned, rows), dtype=np.int64)), to_device(ids)] = float("-inf")
    return x


def _add_bias(x: torch.Tensor, entries: list[BatchEntry], pen: list[int], to_device) -> None:
    """logit_bias of rows `pen`, added in place."""
    biased = [(i, entries[i].params.logit_bias) for i in pen if entries[i].params.logit_bias]
    if biased:  # numpy reads the dicts (a Python tuple per entry cost ~60 ms a step for a whole-vocabulary bias)
        sizes = [len(b) for _, b in biased]
        rows = np.repeat(np.array([i for i, _ in biased], dtype=np.int64), sizes)
        ids = np.concatenate([np.fromiter(b.keys(), dtype=np.int64, count=len(b)) for _, b in biased])
        values = np.concatenate([np.fromiter(b.values(), dtype=np.float32, count=len(b)) for _, b in biased])
        x.index_put_((to_device(rows), to_device(ids)), to_device(values), accumulate=True)


def _penalize(x: torch.Tensor, entries: list[BatchEntry], pen: list[int], prev_token_ids: torch.Tensor | None, to_device,
              vllm_rule: bool) -> None:
    """Repetition, frequency and presence penalties of rows `pen` (all of one rule), in place. SGLang's: frequency
    and presence, then repetition over the output; vLLM's: repetition over the prompt (the ids the batcher
    planned) and the output, then frequency and presence."""
    ps = [entries[i].params for i in pen]
    counted = [k for k, p in enumerate(ps) if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty]
    if not counted:
        return
    pen_rows = to_device(np.array(pen, dtype=np.int64))
    rows, ids = _flat([entries[pen[k]].output_ids for k in counted])
    rows, ids = to_device(np.asarray(np.take(counted, rows), dtype=np.int64)), to_device(ids)
    inflight = [(k, entries[pen[k]].prev_row) for k in counted if entries[pen[k]].prev_row >= 0]
    if inflight:  # the newest output token is still on the device
        k_rows, prev = (to_device(np.array(c, dtype=np.int64)) for c in zip(*inflight))
        rows, ids = torch.cat([rows, k_rows]), torch.cat([ids, prev_token_ids[prev]])
    # one (pinned, asynchronous) upload for the three coefficients
    rep, freq, pres = to_device(np.array([[p.repetition_penalty for p in ps], [p.frequency_penalty for p in ps],
                                          [p.presence_penalty for p in ps]], dtype=np.float32))
    if not vllm_rule:
        _add_counts(x, pen_rows, rows, ids, freq, pres)
    repeated = [k for k in counted if ps[k].repetition_penalty != 1.0]
    if repeated:  # repetition: every token seen in the output (vLLM's rule: and in the prompt)
        k, t = rows, ids
        if vllm_rule:
            p_rows, p_ids = _flat([entries[pen[j]].prompt_ids for j in repeated])
            k = torch.cat([rows, to_device(np.asarray(np.take(repeated, p_rows), dtype=np.int64))])
            t = torch.cat([ids, to_device(p_ids)])
        r = pen_rows[k]
        v = x[r, t]  # read before any write: a pair seen twice writes the same value twice
        x[r, t] = torch.where(v > 0, v / rep[k], v * rep[k])
    if vllm_rule:
        _add_counts(x, pen_rows, rows, ids, freq, pres)


def _add_counts(x: torch.Tensor, pen_rows: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, freq: torch.Tensor,
                pres: torch.Tensor) -> None:
    """Frequency (per occurrence) and presence (once) penalties of the output pairs (`rows` index `pen_rows`)."""
    k, t, first = _sorted_pairs(rows, ids, x.shape[1])
    x.index_put_((pen_rows[k], t), -(freq[k] + pres[k] * first), accumulate=True)
