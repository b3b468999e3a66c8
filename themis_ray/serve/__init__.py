"""Serve a judge over HTTP with Ray Serve: `build_app(cfg, model)` and `run_server(cfg, model)`.

Imported lazily so that the request schemas and the service can be used without importing Ray Serve.
"""

from __future__ import annotations

__all__ = ["app_builder", "build_app", "run_server"]


def __getattr__(name: str):
    if name in __all__:
        from themis_ray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
