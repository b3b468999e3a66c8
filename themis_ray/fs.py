"""Paths on any filesystem: a local path or a pyarrow filesystem URI (`s3://`, `gs://`, `hdfs://`, ...).

Everything that reads or writes a run goes through here, so a `run_dir` on object storage works like a
folder. Credentials and endpoints come from the environment as pyarrow reads them (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible
server); Ray workers on a local cluster inherit it, on a real cluster each node has its own (a Secret
in the pods' environment or a workload identity), never a job's runtime env.
"""

from __future__ import annotations

import json
import os
import posixpath
from functools import lru_cache
from typing import Any, Optional

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """`base` / parts, keeping a URI a URI."""
    base = str(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(os.path.abspath(os.path.expanduser(base)), *parts)


@lru_cache(maxsize=32)
def _filesystem(scheme_and_host: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_host)
    return fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    # One filesystem object per bucket: building an S3 client costs a round of credential lookups.
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest.rstrip("/")


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str) -> Optional[str]:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError) as err:
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return None
        raise err


def write_text(path: str, text: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def read_json(path: str) -> Optional[Any]:
    text = read_text(path)
    return None if text is None else json.loads(text)


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def delete(path: str) -> None:
    """A file or a folder, if it is there."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def list_files(folder: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files directly in `folder` (or below, with `recursive`) ending in `suffix`, as paths within the
    folder's filesystem, sorted; [] when the folder is not there."""
    fs, p = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def children(folder: str) -> list[str]:
    """Names of the files and folders directly in `folder`."""
    fs, p = resolve(folder)
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)))


def upload_dir(local: str, target: str) -> None:
    """Copy a local folder's files into `target` (any filesystem), over files of the same name."""
    fs, p = resolve(target)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_dir(path: str, cache: str = "~/.cache/themis-ray/remote") -> str:
    """A local folder with the content of `path`: itself when local, else a cached download (a model
    folder a later stage loads with from_pretrained, which reads only local files)."""
    if not is_uri(path):
        return os.path.abspath(os.path.expanduser(path))
    import hashlib

    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    listing = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"no files under {path}")
    key = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    target = os.path.join(os.path.expanduser(cache), key)
    if not os.path.isdir(target):
        tmp = f"{target}.tmp{os.getpid()}"
        pafs.copy_files(p, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, target)
    return target
