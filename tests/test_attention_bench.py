"""bench/attention_kernels.py's tuning sweeps plan the cases they are run for (the mid-size-batch split cases once
went missing unnoticed), and every config they time is one the decode launch takes."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import attention_kernels  # noqa: E402

from hotswap.kernels import triton_attention as ta  # noqa: E402


def planned(monkeypatch, which: str) -> list[tuple]:
    cases = []
    monkeypatch.setattr(attention_kernels, "decode_sweep",
                        lambda B, hq, configs, layers=8, context=None, top=None: cases.append((B, hq, context, configs)))
    attention_kernels.sweeps(which)
    return cases


def test_mix_sweep_weighs_program_order_and_mid_size_splits(monkeypatch):
    cases = planned(monkeypatch, "mix")
    assert [(B, hq, context) for B, hq, context, _ in cases] == [
        (512, 16, None), (256, 32, None), (64, 16, None),  # a rollout's mixed contexts: tiles and program order
        (16, 16, None), (32, 16, None), (64, 16, None), (128, 16, None), (64, 16, 192), (128, 16, 256),  # KV splits
        (64, 16, 1000)]
    for _, _, _, configs in cases[:3]:
        assert {c["sorted"] for c in configs} == {False, True}
    for _, _, _, configs in cases[3:]:
        assert {c["num_splits"] for c in configs} == {1, 2, 4, 8} and {c["min_chunk"] for c in configs} == {64, 256}


@pytest.mark.parametrize("which", ["decode", "mix"])
def test_every_swept_config_is_a_decode_launch_argument(monkeypatch, which):
    takes = set(inspect.signature(ta._decode_launch).parameters) | {"sorted"}  # `sorted` becomes `order`
    for _, _, _, configs in planned(monkeypatch, which):
        assert configs and all(set(c) <= takes for c in configs)


def test_every_ab_variant_patches_what_the_engine_reads():
    """bench/attention_ab.py's variants patch module attributes by name: each must exist (a rename would
    otherwise leave the variant running the current setting), and the launch-plan variants return plans."""
    import attention_ab

    for name, patches in attention_ab.VARIANTS.items():
        for module, attr in patches:
            assert hasattr(module, attr), (name, attr)
    for variant in ("one-stage", "two-stages", "eight-splits", "no-long-splits"):
        plan = attention_ab.VARIANTS[variant][(ta, "decode_plan")](64, 8, 4096, "cpu")
        assert isinstance(plan, ta.DecodePlan)
    assert attention_ab.no_long_splits(64, 8, 4096, "cpu") == ta.DecodePlan(1, num_stages=1)
