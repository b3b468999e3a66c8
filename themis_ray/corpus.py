"""Reference documents for instruction synthesis: Python's own docs, or a user's folder of files.

Each document is cut into chunks of about `chunk_chars` characters on paragraph boundaries. Chunks
that cannot be questioned (too short, binary, not UTF-8) come back as rejects with the reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from themis_ray.assets import python_docs
from themis_ray.schema import stable_id

TEXT_SUFFIXES = {".txt", ".md"}


def _folder_documents(folder: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """(source name, text or None, reason when None)."""
    import pyarrow.parquet as pq

    for path in sorted(folder.rglob("*")):
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
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    yield f"{path}:{n}", None, "line is not a JSON object"
                    continue
                if isinstance(text, str):
                    yield f"{path}:{n}", text, None
                else:
                    yield f"{path}:{n}", None, "no string field 'text'"
        elif suffix == ".parquet":
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as err:  # pa.ArrowInvalid is a ValueError
                yield str(path), None, f"unreadable Parquet file ({type(err).__name__})"
                continue
            if "text" not in table.column_names:
                yield str(path), None, "Parquet file has no 'text' column"
                continue
            for n, text in enumerate(table.column("text").to_pylist()):
                yield f"{path}#{n}", text, None if isinstance(text, str) else "text is not a string"


def documents(sources: list[str]) -> Iterator[tuple[str, str | None, str | None]]:
    for source in sources:
        if source == "python-docs":
            for topic, text in python_docs().items():
                yield f"python-docs:{topic}", text, None
        else:
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"corpus.sources: {source!r} is neither 'python-docs' nor a folder")
            yield from _folder_documents(folder)


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Greedy paragraph packing; a paragraph longer than the budget is cut at the budget."""
    chunks, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        while len(para) > chunk_chars:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(para[:chunk_chars])
            para = para[chunk_chars:]
        if current and len(current) + len(para) + 2 > chunk_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


def load_chunks(cfg) -> tuple[list[dict], list[dict]]:
    """(chunks, rejects), at most `cfg.max_docs` chunks, chosen by seed from all that qualify."""
    chunks, rejects = [], []
    for source, text, reason in documents(list(cfg.sources)):
        if text is None:
            rejects.append({"id": stable_id(source), "doc_id": stable_id(source), "raw": source, "reason": reason})
            continue
        if not text.strip():
            rejects.append({"id": stable_id(source), "doc_id": stable_id(source), "raw": source, "reason": "empty document"})
            continue
        for k, chunk in enumerate(chunk_text(text, cfg.chunk_chars)):
            doc_id = stable_id(source, k, chunk)
            if len(chunk) < cfg.min_chars:
                continue  # a heading or a stub: not a reference worth questioning
            chunks.append({"doc_id": doc_id, "source": f"{source}#{k}", "text": chunk})
    random.Random(cfg.seed).shuffle(chunks)
    return chunks[: cfg.max_docs], rejects
