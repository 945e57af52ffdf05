"""`lowdose serve`: the lowdose MONAI Label server (app in ``apps/lowdose``), hardened for a hospital network.

Layout: ``launcher`` (the command), ``auth`` (the access token), ``guard`` (ASGI middleware: token, Host,
Origin, body limit, clean errors), ``asgi`` (MONAI Label's app cut down to lowdose's routes), ``routes``
(infer, finetune, DICOMweb proxy), ``jobs`` (the bounded inference line). See docs/security.md.
"""

from __future__ import annotations

from .launcher import add_parser, main, prepare_sample_studies, serve, server_environment
from .messages import scrub

__all__ = ["add_parser", "main", "prepare_sample_studies", "scrub", "serve", "server_environment"]

_app = None


def __getattr__(name: str):
    # ``lowdose.server:app`` for uvicorn, built on first use (importing this package for the CLI stays light).
    global _app
    if name == "app":
        if _app is None:
            from .asgi import build_app  # MONAI Label and FastAPI: only in the server process

            _app = build_app()
        return _app
    raise AttributeError(name)
