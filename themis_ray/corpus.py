"""Reference documents for instruction synthesis: Python's own docs, a user's folder of files, or a
Hugging Face dataset saved on local disk (`save_to_disk`); nothing is ever downloaded.

Each document is cut into chunks on paragraph boundaries, to a budget of `chunk_chars` characters or,
with `chunk_tokens`, of tokens of the synthesizing model's tokenizer. Documents that cannot be
questioned (empty, binary, not UTF-8, oversized) come back as rejects with the reason.

The driver only lists the sources' units (`document_units`: a file, a saved dataset, a topic of
Python's docs); `unit_chunks` reads one unit and chunks it, on a Ray worker in the synthesize stage
(one task per unit) or in this process (`load_chunks`). A chunk's `rank`, a digest of the seed and its
id, is the seeded order in which chunks are chosen (`corpus.max_docs` of them, lowest rank first), so
the choice needs no global shuffle.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from themis_ray.assets import python_docs
from themis_ray.schema import stable_id

TEXT_SUFFIXES = {".txt", ".md"}


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _dataset_documents(folder: Path, text_field: str) -> Iterator[tuple[str, str | None, str | None]]:
    """A `datasets` folder from `save_to_disk` (one split, or a DatasetDict of splits), read locally."""
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"corpus.sources: {folder} is a saved Hugging Face dataset; reading it needs the "
                           "`datasets` package (pip install datasets)") from err
    loaded = datasets.load_from_disk(str(folder))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in splits:
        name = f"{folder}[{split}]" if split else str(folder)
        if text_field not in ds.column_names:
            yield name, None, f"dataset has no {text_field!r} column (corpus.text_field)"
            continue
        for n, text in enumerate(ds[text_field]):
            yield f"{name}#{n}", text, None if isinstance(text, str) else "text is not a string"


def _folder_documents(folder: Path, text_field: str = "text") -> Iterator[tuple[str, str | None, str | None]]:
    """(source name, text or None, reason when None)."""
    import pyarrow.parquet as pq

    paths = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for path in paths:
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            raw = path.read_bytes()
            if b"\x00" in raw[:4096]:
                yield str(path), None, "binary file (NUL bytes)"
                continue
            try:
                yield str(path), raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield str(path), None, f"not UTF-8 ({err.reason} at byte {err.start})"
        elif suffix == ".jsonl":
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get(text_field)
                except (json.JSONDecodeError, AttributeError):
                    yield f"{path}:{n}", None, "line is not a JSON object"
                    continue
                if isinstance(text, str):
                    yield f"{path}:{n}", text, None
                else:
                    yield f"{path}:{n}", None, f"no string field {text_field!r}"
        elif suffix == ".parquet":
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as err:  # pa.ArrowInvalid is a ValueError
                yield str(path), None, f"unreadable Parquet file ({type(err).__name__})"
                continue
            if text_field not in table.column_names:
                yield str(path), None, f"Parquet file has no {text_field!r} column"
                continue
            for n, text in enumerate(table.column(text_field).to_pylist()):
                yield f"{path}#{n}", text, None if isinstance(text, str) else "text is not a string"


def document_units(sources: list[str]) -> list[dict]:
    """The units a corpus is read in: one per file of a folder, per saved dataset, per topic of
    Python's docs. File names only: the driver never reads a document."""
    units = []
    for source in sources:
        if source == "python-docs":
            units.extend({"kind": "python-docs", "path": topic} for topic in python_docs())
            continue
        path = Path(source).expanduser()
        if path.is_dir() and _is_saved_dataset(path):
            units.append({"kind": "dataset", "path": str(path)})
        elif path.is_dir():
            units.extend({"kind": "file", "path": str(p)} for p in sorted(path.rglob("*")) if p.is_file())
        elif path.exists():
            units.append({"kind": "file", "path": str(path)})
        else:
            raise FileNotFoundError(f"corpus.sources: {source!r} is neither 'python-docs' nor a folder or file")
    return units


def unit_documents(unit: dict, text_field: str = "text") -> Iterator[tuple[str, str | None, str | None]]:
    """(source name, text or None, reason when None) of one unit."""
    if unit["kind"] == "python-docs":
        yield f"python-docs:{unit['path']}", python_docs()[unit["path"]], None
    elif unit["kind"] == "dataset":
        yield from _dataset_documents(Path(unit["path"]), text_field)
    else:
        yield from _folder_documents(Path(unit["path"]), text_field)


def documents(sources: list[str], text_field: str = "text") -> Iterator[tuple[str, str | None, str | None]]:
    for unit in document_units(sources):
        yield from unit_documents(unit, text_field)


def _longest_prefix(text: str, budget: int, length: Callable[[str], int]) -> int:
    """The most characters of `text` whose length is within the budget (at least one)."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(text[:mid]) <= budget else (lo, mid - 1)
    return lo


def chunk_text(text: str, budget: int, length: Callable[[str], int] = len) -> list[str]:
    """Greedy paragraph packing; a paragraph longer than the budget is cut at the budget.

    `length` measures a piece of text: characters by default, or tokens (`token_length`)."""
    chunks, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        while length(para) > budget:
            if current:
                chunks.append(current)
                current = ""
            cut = budget if length is len else _longest_prefix(para, budget, length)
            chunks.append(para[:cut])
            para = para[cut:]
        if current and length(f"{current}\n\n{para}") > budget:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


@lru_cache(maxsize=4)  # once per worker process, not per unit
def token_length(model: str) -> Callable[[str], int]:
    """Token count under a model's tokenizer (a local folder or the embedded default's name)."""
    from transformers import AutoTokenizer

    from themis_ray.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_rank(seed: int, doc_id: str) -> str:
    """A chunk's place in the seeded choice (lowest first): a digest, so no global shuffle is needed."""
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:16]


def unit_chunks(unit: dict, cfg) -> list[dict]:
    """One unit read and chunked: chunk rows (`doc_id`, `source`, `text`, `rank`, `reason` None) and
    document rejects (`reason` set, `source` the document)."""
    max_chars = getattr(cfg, "max_doc_chars", None)
    chunk_tokens = getattr(cfg, "chunk_tokens", None)
    length = token_length(cfg.tokenizer) if chunk_tokens else len
    budget = chunk_tokens or cfg.chunk_chars
    rows = []
    for source, text, reason in unit_documents(unit, getattr(cfg, "text_field", "text")):
        if text is not None and not text.strip():
            reason = "empty document"
        elif text is not None and max_chars and len(text) > max_chars:
            reason = f"oversized document ({len(text)} characters > corpus.max_doc_chars={max_chars})"
        if reason is not None or text is None:
            rows.append({"doc_id": stable_id(source), "source": source, "text": None, "rank": None,
                         "reason": reason})
            continue
        for k, chunk in enumerate(chunk_text(text, budget, length)):
            if len(chunk.strip()) < cfg.min_chars:
                continue  # a heading or a stub: not a reference worth questioning
            doc_id = stable_id(source, k, chunk)
            rows.append({"doc_id": doc_id, "source": f"{source}#{k}", "text": chunk,
                         "rank": chunk_rank(cfg.seed, doc_id), "reason": None})
    return rows


def load_chunks(cfg) -> tuple[list[dict], list[dict]]:
    """(chunks, rejects) in this process: at most `cfg.max_docs` chunks, lowest rank first (the choice
    the synthesize stage makes on its workers), and the documents rejected with their reason."""
    rows = [row for unit in document_units(list(cfg.sources)) for row in unit_chunks(unit, cfg)]
    chunks = sorted((r for r in rows if r["reason"] is None), key=lambda r: r["rank"])[: cfg.max_docs]
    rejects = [{"id": r["doc_id"], "doc_id": r["doc_id"], "raw": r["source"], "reason": r["reason"]}
               for r in rows if r["reason"] is not None]
    return chunks, rejects
