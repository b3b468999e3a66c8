"""Prompt templates as files (Jinja2), rendered here; their digests go into stage manifests."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).parent

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,  # a missing variable is an error, not an empty string
    keep_trailing_newline=False,
    autoescape=False,
    auto_reload=False,  # package files: no stat() per render (their digests go into manifests)
)


def render(name: str, **variables) -> str:
    text = _env.get_template(f"{name}.j2").render(**variables).strip()
    return re.sub(r"\n{3,}", "\n\n", text)  # template branches leave extra blank lines


@lru_cache(maxsize=None)
def template_digest(name: str) -> str:
    return hashlib.sha256((TEMPLATE_DIR / f"{name}.j2").read_bytes()).hexdigest()[:16]
