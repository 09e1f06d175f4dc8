"""L2 hints for what a decode step reads once: the weights of a matmul and the cached keys and values.

Under PDL (kernels/pdl.py) a matmul asks L2 for its first weight lines while the kernels before it still run, and
decode attention streams a layer's whole KV through L2 (50 MB at batch 64 x 192 keys on a 0.6B shape: the size
of an H100's L2). Loads marked `ONCE` (evict-first) leave the lines the next kernels asked for in place instead of
pushing them out. `HOTSWAP_EVICT_FIRST=0` loads them as any other (the A/B switch of the benches).
"""

from __future__ import annotations

import os

try:
    import triton.language as tl
except ImportError:  # CPU-only machines: no kernel is launched there
    tl = None

_WHICH = os.environ.get("HOTSWAP_EVICT_FIRST", "1")


def _policy(on: bool):
    return tl.constexpr("evict_first" if on else "") if tl is not None else ""


#: `eviction_policy` of a load whose lines no later kernel of the step reads: a matmul's weights, decode attention's KV.
WEIGHTS_ONCE = _policy(_WHICH in ("1", "w"))
KV_ONCE = _policy(_WHICH in ("1", "kv"))
