"""Which key a request needs, as SGLang decides it (python/sglang/srt/utils/auth.py::decide_request_auth).

- Probes pass without a key: OPTIONS, and paths under /health, /ready and /metrics (health checks and Prometheus
  scrapes carry no secrets; slime's health monitor polls /health_generate).
- Admin routes (every route that changes the engine's state or reads its weights: SGLang's ADMIN_OPTIONAL ones and
  ours beside them) need the admin key when one is set (the API key is then refused there), else the API key when
  one is set, else nothing.
- Every other route (generation, tokenization, read-only status) needs the API key when one is set; the admin key
  alone protects only the admin routes.

A key comes as `Authorization: Bearer KEY` (the scheme in any case) or as an `x-api-key` header. Routes are told
apart by path before routing: an admin route is any path not named in `NORMAL_PATHS`, so a route added later is
protected unless it is listed here.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

PROBE_PREFIXES = ("/health", "/ready", "/metrics")

# generation, tokenization and read-only status: SGLang's NORMAL routes that hotswap serves, and vLLM's
NORMAL_PATHS = frozenset({
    "/generate", "/v1/completions", "/v1/chat/completions", "/inference/v1/generate",
    "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize",
    "/get_model_info", "/model_info", "/get_server_info", "/server_info", "/get_load", "/v1/loads", "/v1/models",
    "/get_weight_version", "/weight_version", "/is_paused", "/is_sleeping", "/get_world_size", "/liveness",
})
NORMAL_PREFIXES = ("/v1/models/",)


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The server's keys (None: not set)."""

    api_key: str | None = None
    admin_api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("api_key", "admin_api_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} is empty: give a real key, or none to serve without it")

    @property
    def any(self) -> bool:
        return self.api_key is not None or self.admin_api_key is not None

    def required(self, method: str, path: str) -> str | None:
        """The key this request must carry (None: none)."""
        if method == "OPTIONS" or path.startswith(PROBE_PREFIXES):
            return None
        if path in NORMAL_PATHS or path.startswith(NORMAL_PREFIXES):
            return self.api_key
        return self.admin_api_key if self.admin_api_key is not None else self.api_key

    def admits(self, method: str, path: str, headers: dict[bytes, bytes]) -> bool:
        """Whether the request carries the key its route needs."""
        key = self.required(method, path)
        if key is None:
            return True
        expected = key.encode()
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):
            return True
        return hmac.compare_digest(headers.get(b"x-api-key", b""), expected)
