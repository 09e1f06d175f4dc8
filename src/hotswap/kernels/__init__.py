"""Hand-written GPU kernels (Triton) used by the GPU backend.

Modules here import Triton lazily / defensively so that the package still imports on a
CPU-only machine without Triton; calling a kernel there raises a clear error instead.

* :mod:`hotswap.kernels.triton_attention` -- paged attention over the engine's KV cache
  layout ``[num_pages, page_size, num_kv_heads, head_dim]``: split-KV decode
  (flash-decoding) and ragged causal "extend" prefill.
"""
