"""Reference documents for instruction synthesis: Python's own docs, a user's folder of files, or a
Hugging Face dataset saved on local disk (`save_to_disk`); nothing is ever downloaded.

Each document is cut into chunks on paragraph boundaries, to a budget of `chunk_chars` characters or,
with `chunk_tokens`, of tokens of the synthesizing model's tokenizer. Documents that cannot be
questioned (empty, binary, not UTF-8, oversized) come back as rejects with the reason.
"""

from __future__ import annotations

import json
import random
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


def documents(sources: list[str], text_field: str = "text") -> Iterator[tuple[str, str | None, str | None]]:
    for source in sources:
        if source == "python-docs":
            for topic, text in python_docs().items():
                yield f"python-docs:{topic}", text, None
            continue
        path = Path(source).expanduser()
        if path.is_dir() and _is_saved_dataset(path):
            yield from _dataset_documents(path, text_field)
        elif path.exists():
            yield from _folder_documents(path, text_field)
        else:
            raise FileNotFoundError(f"corpus.sources: {source!r} is neither 'python-docs' nor a folder or file")


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


def token_length(model: str) -> Callable[[str], int]:
    """Token count under a model's tokenizer (a local folder or the embedded default's name)."""
    from transformers import AutoTokenizer

    from themis_ray.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_chunks(cfg) -> tuple[list[dict], list[dict]]:
    """(chunks, rejects), at most `cfg.max_docs` chunks, chosen by seed from all that qualify."""
    chunks, rejects = [], []
    max_chars = getattr(cfg, "max_doc_chars", None)
    chunk_tokens = getattr(cfg, "chunk_tokens", None)
    length = token_length(cfg.tokenizer) if chunk_tokens else len
    budget = chunk_tokens or cfg.chunk_chars
    for source, text, reason in documents(list(cfg.sources), getattr(cfg, "text_field", "text")):
        if text is not None and not text.strip():
            reason = "empty document"
        elif text is not None and max_chars and len(text) > max_chars:
            reason = f"oversized document ({len(text)} characters > corpus.max_doc_chars={max_chars})"
        if reason is not None or text is None:
            rejects.append({"id": stable_id(source), "doc_id": stable_id(source), "raw": source, "reason": reason})
            continue
        for k, chunk in enumerate(chunk_text(text, budget, length)):
            doc_id = stable_id(source, k, chunk)
            if len(chunk.strip()) < cfg.min_chars:
                continue  # a heading or a stub: not a reference worth questioning
            chunks.append({"doc_id": doc_id, "source": f"{source}#{k}", "text": chunk})
    random.Random(cfg.seed).shuffle(chunks)
    return chunks[: cfg.max_docs], rejects
