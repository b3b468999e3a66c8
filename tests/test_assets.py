"""Embedded models assembled from registry packages: parts in order, sha256 checked, clear errors."""

from __future__ import annotations

import hashlib

import pytest

from themis_ray import assets
from themis_ray.cli import main


def _parts(tmp_path, monkeypatch, chunks: list[bytes]) -> None:
    """Installed-package stand-ins on sys.path: fakepartN/data/partNN.bin, as the real parts lay out."""
    site = tmp_path / "site"
    for i, chunk in enumerate(chunks, start=1):
        data = site / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("THEMIS_CACHE", str(tmp_path / "cache"))


def _model(chunks: list[bytes], sha256: str | None) -> assets.EmbeddedModel:
    return assets.EmbeddedModel("fake-model", assets._chunks("fakepart", "1.0", len(chunks)), sha256=sha256)


def test_parts_concatenate_in_order_and_are_checked_once(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second", b"third and last"]
    _parts(tmp_path, monkeypatch, chunks)
    whole = b"".join(chunks)
    monkeypatch.setitem(assets.EMBEDDED_MODELS, "fake-model", _model(chunks, hashlib.sha256(whole).hexdigest()))
    path = assets.gguf_path("fake-model")
    assert path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert assets.gguf_path("fake-model").stat().st_mtime_ns == stamp  # assembled once, then reused


def test_a_wrong_part_is_refused_with_the_pinned_versions(tmp_path, monkeypatch):
    chunks = [b"GGUF one", b"two"]
    _parts(tmp_path, monkeypatch, chunks)
    monkeypatch.setitem(assets.EMBEDDED_MODELS, "fake-model", _model(chunks, "0" * 64))
    with pytest.raises(RuntimeError, match=r"sha256 .* expected 0{64}.*fakepart1==1\.0"):
        assets.gguf_path("fake-model")
    assert not list((tmp_path / "cache" / "gguf").glob("fake-model*"))  # nothing half-written left


def test_a_missing_part_names_its_package(tmp_path, monkeypatch):
    _parts(tmp_path, monkeypatch, [b"GGUF one"])
    monkeypatch.setitem(assets.EMBEDDED_MODELS, "fake-model", _model([b"a", b"b"], None))
    with pytest.raises(RuntimeError, match=r"'fakepart2' is not installed.*fakepart2==1\.0"):
        assets.gguf_path("fake-model")


def test_the_qwen_parts_are_pinned_by_version_and_digest():
    for name, count in (("qwen2.5-coder-1.5b-instruct", 22), ("qwen2.5-coder-0.5b-instruct", 6)):
        model = assets.EMBEDDED_MODELS[name]
        assert len(model.parts) == count and len(model.sha256) == 64
        assert [p[3] for p in model.parts] == [f"data/part{i:02d}.bin" for i in range(1, count + 1)]


def test_cli_refuses_an_unknown_model(capsys):
    assert main(["assets", "no-such-model"]) == 2
    assert "qwen2.5-coder-1.5b-instruct" in capsys.readouterr().err
