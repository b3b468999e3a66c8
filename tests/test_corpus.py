"""Corpus reading and chunking: budgets, every file kind, rejects with reasons."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from requires import require
from themis_ray.corpus import chunk_text, documents, load_chunks


def _paragraphs(n, size):
    return [f"P{i:03d} " + ("word " * size)[: size - 5].strip() + "." for i in range(n)]


@pytest.mark.parametrize("budget", [60, 200, 1000])
def test_chunk_text_respects_budget_and_keeps_every_paragraph(budget):
    paras = _paragraphs(12, 40) + ["L" * 450, "short one"] + _paragraphs(5, 150)
    text = "\n\n".join(paras)
    chunks = chunk_text(text, budget)
    assert chunks and all(0 < len(c) <= budget for c in chunks)
    joined = "\n\n".join(chunks)
    for p in paras:
        if len(p) <= budget:
            assert p in joined, p
    # nothing is lost or duplicated: with separators removed, the text is the same characters
    assert "".join(joined.split()) == "".join(text.split())


def test_chunk_text_packs_greedily_on_paragraph_boundaries():
    text = "aaaa\n\nbbbb\n\ncccc\n\ndddd"
    # "aaaa\n\nbbbb" is 10 characters: two paragraphs fit a budget of 10, three do not
    assert chunk_text(text, 10) == ["aaaa\n\nbbbb", "cccc\n\ndddd"]
    assert chunk_text(text, 9) == ["aaaa", "bbbb", "cccc", "dddd"]
    assert chunk_text(text, 100) == [text]


def test_chunk_text_cuts_a_long_paragraph_at_the_budget():
    assert chunk_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert chunk_text("ab\n\n" + "y" * 12, 10) == ["ab", "y" * 10, "yy"]


def test_chunk_text_empty():
    assert chunk_text("", 10) == []
    assert chunk_text("\n\n\n\n", 10) == []


def _folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "good.txt").write_text("Good text document.\n\nSecond paragraph.")
    (d / "sub" / "notes.md").write_text("# Notes\n\nMarkdown body.")
    (d / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00stuff")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    lines = [json.dumps({"text": "first jsonl text"}), "{not json", json.dumps({"title": "no text"}),
             "", json.dumps({"text": 5}), json.dumps(["a", "list"]), json.dumps({"text": "last jsonl text"})]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["pq one", None, "pq three"], "n": [1, 2, 3]}), d / "with_text.parquet")
    pq.write_table(pa.table({"body": ["x"]}), d / "without_text.parquet")
    (d / "ignored.csv").write_text("text\nnot a supported suffix\n")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    return d


def test_folder_documents_and_rejects(tmp_path):
    d = _folder(tmp_path)
    got = {src: (text, reason) for src, text, reason in documents([str(d)])}
    assert got[str(d / "good.txt")] == ("Good text document.\n\nSecond paragraph.", None)
    assert got[str(d / "sub" / "notes.md")] == ("# Notes\n\nMarkdown body.", None)
    assert got[str(d / "blob.txt")][0] is None and "binary" in got[str(d / "blob.txt")][1]
    text, reason = got[str(d / "latin1.txt")]
    assert text is None and "not UTF-8" in reason and "byte 3" in reason
    j = str(d / "data.jsonl")
    assert got[f"{j}:1"] == ("first jsonl text", None)
    assert got[f"{j}:2"] == (None, "line is not a JSON object")
    assert got[f"{j}:3"] == (None, "no string field 'text'")
    assert f"{j}:4" not in got  # a blank line is skipped
    assert got[f"{j}:5"] == (None, "no string field 'text'")
    assert got[f"{j}:6"] == (None, "line is not a JSON object")
    assert got[f"{j}:7"] == ("last jsonl text", None)
    p = str(d / "with_text.parquet")
    assert got[f"{p}#0"] == ("pq one", None)
    assert got[f"{p}#1"] == (None, "text is not a string")
    assert got[f"{p}#2"] == ("pq three", None)
    assert got[str(d / "without_text.parquet")] == (None, "Parquet file has no 'text' column")
    text, reason = got[str(d / "corrupt.parquet")]
    assert text is None and reason.startswith("unreadable Parquet file")
    assert not any("ignored.csv" in s for s in got)
    assert len(got) == 15  # 4 text files, 6 JSONL lines, 3 + 1 + 1 Parquet entries


def test_load_chunks_returns_chunks_and_rejects_with_reasons(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    long_para = "Python is a programming language that lets you work quickly. " * 4  # ~250 chars
    (d / "a.txt").write_text(f"{long_para}\n\n{long_para}")
    (d / "tiny.txt").write_text("too short")
    (d / "empty.md").write_text("   \n\n ")
    (d / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    cfg = SimpleNamespace(sources=[str(d)], max_docs=10, chunk_chars=300, min_chars=200, seed=0)
    chunks, rejects = load_chunks(cfg)
    assert len(chunks) == 2
    assert all(c["text"] == long_para.strip() for c in chunks)
    assert {c["source"] for c in chunks} == {f"{d / 'a.txt'}#0", f"{d / 'a.txt'}#1"}
    assert len({c["doc_id"] for c in chunks}) == 2
    reasons = {r["raw"]: r["reason"] for r in rejects}
    assert reasons[str(d / "empty.md")] == "empty document"
    assert reasons[str(d / "bad.txt")].startswith("not UTF-8")
    assert str(d / "tiny.txt") not in reasons  # too-short chunks are skipped, not rejected
    assert all(r["id"] and r["doc_id"] for r in rejects)

    cfg.max_docs = 1
    one, _ = load_chunks(cfg)
    assert len(one) == 1 and one[0] in chunks
    # the same seed gives the same choice; the ids are stable across calls
    assert load_chunks(cfg)[0] == one


def test_python_docs_source_yields_text():
    docs = list(documents(["python-docs"]))
    assert len(docs) > 50
    assert all(src.startswith("python-docs:") and reason is None for src, _, reason in docs)
    by_topic = {src.split(":", 1)[1]: text for src, text, _ in docs}
    assert "for" in by_topic and "for" in by_topic["for"].lower()
    cfg = SimpleNamespace(sources=["python-docs"], max_docs=4, chunk_chars=1500, min_chars=200, seed=1)
    chunks, rejects = load_chunks(cfg)
    assert len(chunks) == 4 and rejects == []
    assert all(200 <= len(c["text"]) <= 1500 for c in chunks)


def test_missing_folder_raises_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(documents([missing]))


def test_oversized_documents_are_rejected_with_the_limit(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    para = "Python is a programming language that lets you work quickly. " * 4
    (d / "ok.txt").write_text(para)
    (d / "huge.txt").write_text((para + "\n\n") * 20)
    cfg = SimpleNamespace(sources=[str(d)], max_docs=10, chunk_chars=300, min_chars=200, seed=0,
                          max_doc_chars=len(para) + 10)
    chunks, rejects = load_chunks(cfg)
    assert [c["source"] for c in chunks] == [f"{d / 'ok.txt'}#0"]
    [reject] = rejects
    assert reject["raw"] == str(d / "huge.txt")
    assert reject["reason"].startswith("oversized document (") and "max_doc_chars" in reject["reason"]


def test_chunk_text_to_a_token_budget():
    from themis_ray.corpus import token_length

    length = token_length("smollm2-135m-instruct")
    paras = _paragraphs(10, 120) + ["Z" * 3000]
    text = "\n\n".join(paras)
    chunks = chunk_text(text, 64, length)
    assert len(chunks) > 3 and all(0 < length(c) <= 64 for c in chunks)
    assert "".join("\n\n".join(chunks).split()) == "".join(text.split())
    # a budget in tokens packs more characters than the same number as a character budget
    assert max(map(len, chunks)) > 64


def test_a_single_file_source(tmp_path):
    f = tmp_path / "one.md"
    f.write_text("# Title\n\nBody text.")
    assert list(documents([str(f)])) == [(str(f), "# Title\n\nBody text.", None)]


def test_local_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = require("datasets")
    para = "A saved dataset row about Python's data model and its special methods. " * 4
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"body": [para, "", None, para + " Second."]}).save_to_disk(str(single))
    with_splits = tmp_path / "splits"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": [para]}),
        "test": datasets.Dataset.from_dict({"other": ["no body column"]}),
    }).save_to_disk(str(with_splits))
    got = list(documents([str(single), str(with_splits)], text_field="body"))
    assert got[0] == (f"{single}#0", para, None)
    assert got[2] == (f"{single}#2", None, "text is not a string")
    by_source = {src: reason for src, _, reason in got}
    assert by_source[f"{with_splits}[train]#0"] is None
    assert by_source[f"{with_splits}[test]"] == "dataset has no 'body' column (corpus.text_field)"
    cfg = SimpleNamespace(sources=[str(single)], max_docs=10, chunk_chars=1000, min_chars=100, seed=0,
                          text_field="body")
    chunks, rejects = load_chunks(cfg)
    assert len(chunks) == 2
    assert {r["reason"] for r in rejects} == {"empty document", "text is not a string"}
