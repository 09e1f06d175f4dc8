"""Rotary frequencies of every rope type hotswap serves, computed as transformers' modeling_rope_utils computes them
(`_compute_*_parameters`): (inverse frequencies [head_dim / 2], attention factor scaling cos and sin)."""

from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """On the CPU in float32, as transformers computes them at init (the table is then built on the device)."""
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "linear":
        return _inv_freq(head_dim, theta) / scaling["factor"], 1.0
    if kind == "dynamic":
        return _dynamic(head_dim, theta, scaling["factor"], max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_position_embeddings)
    if kind == "llama3":
        return _llama3(_inv_freq(head_dim, theta), scaling), 1.0
    return _inv_freq(head_dim, theta), 1.0


def _inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _dynamic(dim: int, base: float, factor: float, max_position_embeddings: int) -> torch.Tensor:
    """Dynamic NTK at a sequence length within max_position_embeddings, the only lengths served with it
    (config.model_config_for): transformers rescales the base from the batch's longest sequence past that length."""
    seq_len = max_position_embeddings
    base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return _inv_freq(dim, base)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, s: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = s.get("original_max_position_embeddings") or max_position_embeddings  # transformers' default
    factor = s.get("factor") or max_position_embeddings / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                            else _yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
