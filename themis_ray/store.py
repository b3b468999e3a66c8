"""A stage's output on disk: `<run_dir>/<stage>/` with Parquet parts, `_rejects/` and `_manifest.json`.

A stage is written into a temporary folder and renamed into place when complete, so a crash never
leaves a half-written stage that looks finished. A re-run skips a stage whose manifest fingerprint
(config digest, input manifests, prompt templates, engines) matches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from themis_ray.schema import REJECT

MANIFEST = "_manifest.json"
REJECTS = "_rejects"
PARTIAL = "_partial"  # finished blocks of an unfinished run, for resuming it


@dataclass
class StageResult:
    """What a stage hands to the store."""

    table: Optional[pa.Table]  # all rows, rejects flagged in `reject_reason`; None for no table
    rows_in: int
    # For fan-out stages (one input unit -> several rows) how many input units succeeded.
    units_ok: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


class StageStore:
    def __init__(self, run_dir: str | Path, stage: str):
        if "://" in str(run_dir):
            # Stages write through the local filesystem (the train stage's rank 0 exports the judge
            # from whichever node it runs on), so a bucket URI would silently become a local folder.
            raise ValueError(
                f"run_dir must be a filesystem path, got the URI {run_dir!r}: on several nodes use a "
                "path every node mounts (a shared volume), and copy the finished run to object storage "
                "with the jobs' `--export URI` (see cluster/README.md)"
            )
        self.stage = stage
        self.path = Path(run_dir).expanduser().resolve() / stage
        self.manifest_path = self.path / MANIFEST

    # -- reading ---------------------------------------------------------------------------------
    def manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def is_done(self, fingerprint: dict) -> bool:
        m = self.manifest()
        return m is not None and m.get("fingerprint") == fingerprint

    def parquet_files(self) -> list[str]:
        return sorted(str(p) for p in self.path.glob("*.parquet"))

    def read(self) -> pa.Table:
        files = self.parquet_files()
        if not files:
            raise FileNotFoundError(f"stage {self.stage!r} has no output in {self.path}; run it first")
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")

    def read_rejects(self) -> pa.Table:
        files = sorted((self.path / REJECTS).glob("*.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})

    # -- writing ---------------------------------------------------------------------------------
    def staging_dir(self, fingerprint: dict | None = None) -> Path:
        """The folder a run writes into; it becomes the stage folder when the stage commits.

        Finished blocks that an interrupted run with the same fingerprint left in `_partial/` are
        kept, so the stage resumes; anything else there is cleared.
        """
        tmp = self.path.with_name(self.path.name + ".tmp")
        partial = tmp / PARTIAL
        marker = partial / "_fingerprint.json"
        keep = fingerprint is not None and marker.is_file() and json.loads(marker.read_text()) == fingerprint
        if tmp.exists():
            for child in tmp.iterdir():
                if not (keep and child.name == PARTIAL):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None:
            partial.mkdir(exist_ok=True)
            marker.write_text(json.dumps(fingerprint, sort_keys=True))
        return tmp

    def commit(self, result: StageResult, fingerprint: dict, wall_s: float, staging: Path | None = None) -> dict:
        tmp = staging or self.staging_dir()
        rows_out = rows_rejected = 0
        if result.table is not None:
            flagged = pc.is_valid(result.table[REJECT])
            kept = result.table.filter(pc.invert(flagged)).drop_columns([REJECT])
            rejects = result.table.filter(flagged)
            rows_out, rows_rejected = kept.num_rows, rejects.num_rows
            pq.write_table(kept, tmp / "part-00000.parquet")
            (tmp / REJECTS).mkdir(exist_ok=True)
            pq.write_table(rejects, tmp / REJECTS / "part-00000.parquet")
        shutil.rmtree(tmp / PARTIAL, ignore_errors=True)  # its rows are in the parts now
        units_ok = result.units_ok if result.units_ok is not None else rows_out
        if result.table is not None and result.rows_in != units_ok + rows_rejected:
            raise RuntimeError(
                f"stage {self.stage!r} lost rows: {result.rows_in} in, {units_ok} out, "
                f"{rows_rejected} rejected"
            )
        manifest = {
            "stage": self.stage,
            "fingerprint": fingerprint,
            "rows_in": result.rows_in,
            "rows_out": rows_out,
            "units_ok": units_ok,
            "rows_rejected": rows_rejected,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **result.extra,
        }
        manifest["digest"] = hashlib.sha256(
            json.dumps([fingerprint, rows_out, rows_rejected], sort_keys=True).encode()
        ).hexdigest()[:16]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if self.path.exists():
            # Move the old stage aside (a rename is atomic) rather than deleting it in place: a crash
            # half-way through a delete could leave its manifest next to missing parts, looking done.
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(self.path)
        return manifest
