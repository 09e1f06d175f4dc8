"""The HTTP server: OpenAI-compatible and SGLang-native routes on one Engine.

`create_app(engine, api_key=..., served_model_name=...)` builds the FastAPI app;
`serve(args)` (what `hotswap serve` runs) builds the engine and runs uvicorn.
"""

from __future__ import annotations

__all__ = ["ServerThread", "add_serve_arguments", "create_app", "serve"]


def __getattr__(name: str):
    # fastapi and the engine are heavy; import on first use so `hotswap --help` stays quick
    if name == "create_app":
        from hotswap.server.app import create_app

        return create_app
    if name in ("serve", "add_serve_arguments", "ServerThread"):
        from hotswap.server import launch

        return getattr(launch, name)
    raise AttributeError(name)
