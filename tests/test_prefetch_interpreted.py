"""The L2 prefetch kernel's byte spans (kernels/l2_prefetch.py `_spans`, which its lanes ask for) through Triton's
interpreter on the CPU: a launch of `_programs(nbytes)` programs covers a tensor's bytes once, in 16-byte multiples,
and asks for none past its end. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI);
the inline prefetch itself only compiles (tests/test_kernel_compile.py), the interpreter cannot run PTX."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hotswap.kernels import l2_prefetch  # noqa: E402


@triton.jit
def _spans_kernel(OFFS, SIZES, nbytes, CHUNK_BYTES: tl.constexpr, LANES: tl.constexpr):
    program = tl.program_id(0)
    offs, size = l2_prefetch._spans(nbytes, program, CHUNK_BYTES, LANES)
    lanes = program * LANES + tl.arange(0, LANES)
    tl.store(OFFS + lanes, offs)
    tl.store(SIZES + lanes, size)


@pytest.mark.parametrize("nbytes", [16, l2_prefetch.CHUNK, 32 * l2_prefetch.CHUNK, 32 * l2_prefetch.CHUNK + 16,
                                    12_582_912])
def test_the_lanes_ask_for_every_byte_once(nbytes):
    programs = l2_prefetch._programs(nbytes)
    lanes = programs * l2_prefetch._LANES
    offs, sizes = torch.full((lanes,), -1, dtype=torch.int64), torch.full((lanes,), -1, dtype=torch.int32)
    _spans_kernel[(programs,)](offs, sizes, nbytes, CHUNK_BYTES=l2_prefetch.CHUNK, LANES=l2_prefetch._LANES)
    asked = [(int(o), int(s)) for o, s in zip(offs, sizes) if s > 0]
    assert [o for o, _ in asked] == [i * l2_prefetch.CHUNK for i in range(len(asked))]  # in order, no gap
    assert sum(s for _, s in asked) == nbytes  # every byte once, none past the end
    assert all(s % 16 == 0 for _, s in asked) and bool((sizes >= 0).all())
    assert sizes[-l2_prefetch._LANES:].gt(0).any()  # no idle program
