"""What every job entrypoint in this folder shares: run one `themis-ray` command as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --entrypoint-num-cpus 0 --entrypoint-num-gpus 0 \\
        --runtime-env cluster/runtime-env.yaml \\
        -- python jobs/<stage or pipeline>.py --config CONFIG [--force] [--export URI] [key=value ...]

Arguments are those of `themis-ray <command>` (config file, `--force`, OmegaConf `key=value`
overrides), plus `--export URI`: once the command succeeded, copy the stages it ran from `run_dir`
to `URI/<stage>/` through pyarrow's filesystems (`s3://`, `gs://`, `hdfs://`, `file://` or a plain
path). `run_dir` itself may be a bucket URI (`s3://bucket/runs/x`) or a path every node of the
cluster sees: the workers read and write it directly.

The driver only plans and counts: Ray Data actor pools, Ray Train workers and their CPUs/GPUs are
requested by the stages themselves (`<stage>.pool.num_cpus/num_gpus/resources`, `train.num_workers`,
`train.use_gpu`), so the entrypoint reserves nothing (`ENTRYPOINT_NUM_CPUS`, `ENTRYPOINT_NUM_GPUS`)
and runs on the head node, next to the job server. It holds no stage table: its memory does not grow
with the number of rows.

The job's driver connects to the cluster it was submitted to (`ray job submit` sets RAY_ADDRESS,
which `themis_ray.pipeline.init_ray` follows).
"""

from __future__ import annotations

import argparse
import os
import sys

# What a job's driver reserves: `--entrypoint-num-cpus` / `--entrypoint-num-gpus` of `ray job submit`,
# `entrypoint_num_cpus` / `entrypoint_num_gpus` of JobSubmissionClient.submit_job, and
# `entrypointNumCpus` / `entrypointNumGpus` of a KubeRay RayJob.
ENTRYPOINT_NUM_CPUS = 0
ENTRYPOINT_NUM_GPUS = 0

# The runtime environment the jobs are submitted with (cluster/runtime-env.yaml holds the same):
# the project folder as working_dir, without what is not code.
RUNTIME_ENV_EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info", "build", "dist"]


def _split_export(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--export", default=None)
    known, rest = parser.parse_known_args(argv)
    return known.export, rest


def _config(argv: list[str]):
    from themis_ray.config import load

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("--force", action="store_true")
    known, overrides = parser.parse_known_args(argv)
    return load(known.config, overrides)


def export_run(run_dir: str, stages: list[str], uri: str) -> list[str]:
    """Copy `run_dir/<stage>/` to `uri/<stage>/` for each stage (replacing an earlier export there, and
    refusing a folder that is not a stage's); either end may be a local path or a URI."""
    import pyarrow.fs as pafs

    from themis_ray import fs
    from themis_ray.store import MANIFEST, StageStore

    copied = []
    for stage in stages:
        source, destination = fs.join(run_dir, stage), fs.join(uri, stage)
        if not fs.exists(fs.join(source, MANIFEST)):
            raise FileNotFoundError(f"stage {stage!r} has no finished output in {source}; nothing to export")
        StageStore.at(destination).claim()  # someone else's folder of that name is not deleted
        fs.delete(destination)
        (source_fs, source_path), (destination_fs, destination_path) = fs.resolve(source), fs.resolve(destination)
        destination_fs.create_dir(destination_path, recursive=True)
        pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                        destination_filesystem=destination_fs)
        copied.append(destination)
    return copied


def main(command: str, argv: list[str]) -> int:
    """Run `themis-ray <command> argv...`; with `--export URI`, copy its stages there afterwards."""
    from themis_ray.cli import main as cli_main

    export, argv = _split_export(argv)
    address = os.environ.get("RAY_ADDRESS") or "a local Ray (RAY_ADDRESS is not set)"
    print(f"themis-ray {command} job on {address}", flush=True)
    rc = cli_main([command, *argv])
    if rc or not export:
        return rc
    from themis_ray.stages.registry import selected

    cfg = _config(argv)
    stages = selected(cfg) if command == "pipeline" else [command]
    for path in export_run(cfg.run_dir, stages, export):
        print(f"exported {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
