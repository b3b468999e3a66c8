"""The request cache: an endpoint's answers kept on the run's storage, so nothing is paid for twice.

A request is keyed by a digest of the engine kind, the model and the whole request body (messages,
sampling, seed, log-probabilities asked for). Each answer is one small JSON object at
`<folder>/<key[:2]>/<key>.json`, on any filesystem `themis_ray.fs` resolves (a path, `s3://`, `gs://`),
written by the worker that received it before the answer is used: a block that runs again after a
crash, a lost node or a resume reads its answers back instead of asking. Only answers are kept; a
failed request is asked again. On a local filesystem an entry is written under a temporary name and
renamed; on object storage an upload appears whole or not at all, so a reader never sees half an entry
(one it cannot parse counts as a miss).

Like datatrove's inference cache (a digest of the request payload per document), but shared by every
worker of the cluster through the run's storage instead of a local database per rank.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Any, Optional

import pyarrow.fs as pafs

from themis_ray import fs
from themis_ray.store import CACHE as CACHE_DIR  # kept when the folder it is in starts afresh


def request_key(kind: str, request: dict) -> str:
    """A digest of what decides an answer: the engine kind, and the request (model, messages, sampling)."""
    blob = json.dumps({"engine": kind, **request}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, self.path = fs.resolve(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._made: set[str] = set()  # folders created so far (one create_dir per folder per process)

    def _entry(self, key: str) -> tuple[str, str]:
        folder = posixpath.join(self.path, key[:2])
        return folder, posixpath.join(folder, f"{key}.json")

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The kept answer of `key`, or None."""
        _, path = self._entry(key)
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        except OSError:  # pyarrow's not-found on some filesystems; anything else would fail again below
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise

    def put(self, key: str, value: dict[str, Any]) -> None:
        folder, path = self._entry(key)
        if folder not in self._made:
            self.fs.create_dir(folder, recursive=True)
            self._made.add(folder)
        blob = json.dumps(value, ensure_ascii=False).encode()
        writing = f"{path}.{uuid.uuid4().hex[:8]}.partial" if self.local else path
        with self.fs.open_output_stream(writing) as f:
            f.write(blob)
        if self.local:
            self.fs.move(writing, path)


def cache_folder(cache_cfg, root: str) -> Optional[str]:
    """The request cache's folder for a run under `root` (a run_dir, a judge job's output), from the
    `cache` config section; None when it is off."""
    if cache_cfg is None or not cache_cfg.enabled:
        return None
    return str(cache_cfg.path) if cache_cfg.path else fs.join(str(root), CACHE_DIR, "requests")


def with_cache(engine_cfg, folder: Optional[str]):
    """`engine_cfg` with its request cache set to `folder` (an engine that calls no endpoint ignores it);
    one whose own `cache` is set keeps it."""
    from omegaconf import OmegaConf

    if folder is None or engine_cfg is None or getattr(engine_cfg, "cache", None):
        return engine_cfg
    if OmegaConf.is_config(engine_cfg):
        return OmegaConf.merge(engine_cfg, {"cache": folder})
    from dataclasses import replace

    return replace(engine_cfg, cache=folder)
