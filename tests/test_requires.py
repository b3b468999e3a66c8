"""The suite's own rules: a missing test dependency skips locally and fails in CI."""

from __future__ import annotations

import pytest

from requires import require

MISSING = "themis_ray_no_such_test_dependency"


def test_a_missing_test_dependency_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require(MISSING)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError, match=f"test dependency '{MISSING}' is missing and CI=true"):
        require(MISSING)
    assert require("json").dumps([1]) == "[1]"  # present: the module itself, in CI or not
