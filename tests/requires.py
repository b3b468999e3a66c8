"""Test dependencies (the `dev` extra): a test that needs one is skipped where it is missing, except in
CI (`CI=true`), where a missing one fails the run: a skip there would hide a test that never ran."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(module: str) -> ModuleType:
    """`module`, imported; missing: skipped locally, an ImportError naming the dev extra in CI."""
    if not in_ci():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"test dependency {module!r} is missing and CI=true: install the dev extra "
                          f"(pip install -e '.[dev]'); {err}") from err
