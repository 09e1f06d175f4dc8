"""L2 hint for what decode attention reads once a step: the cached keys and values.

At batch 64 x 192 keys a 0.6B layer's KV is 50 MB, an H100's whole L2, streamed once a step. Under PDL
(kernels/pdl.py) the matmul after attention asks L2 for its first weight lines while attention still runs; keys and
values loaded evict-first leave those lines in place instead of pushing them out. H100, 0.6B shape: in one call the
batch-64 decode graph 1.558 -> 1.523 ms (attention's share of its critical path 20.4 -> 18.3 us a layer); in another,
batch 64 34,309 / 34,517 -> 34,944 / 35,125 tokens/s (two runs each; with the hint off 34,126) and the sampled 0.6B
rollout 10.58 -> 10.36 s. The same hint on the matmuls' weight loads measured nothing (1.556 ms) and is not used.
`HOTSWAP_EVICT_FIRST=0` loads KV as any other data (the A/B switch of the benches).
"""

from __future__ import annotations

import os

try:
    import triton.language as tl
except ImportError:  # CPU-only machines: no kernel is launched there
    tl = None

_ON = os.environ.get("HOTSWAP_EVICT_FIRST", "1") != "0"
#: `eviction_policy` of decode attention's key and value loads.
KV_ONCE = tl.constexpr("evict_first" if _ON else "") if tl is not None else ""
