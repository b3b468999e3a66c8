"""The stage runner: each stage (`themis_ray.stages.registry`) reads its inputs' outputs, writes its
own, or is skipped.

A stage is skipped when its manifest's fingerprint (its config section, its inputs' manifest digests,
the prompt and scenario files, the package version) matches; `force` re-runs it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow.fs as pafs

from omegaconf import OmegaConf

from themis_ray import __version__, fs, prompts, scenarios
from themis_ray.config import digest
from themis_ray.stages.registry import STAGES, Stage, selected
from themis_ray.store import StageResult, StageStore


def content_digest(path: str) -> Optional[str]:
    """A digest of a file's or a folder's content (any filesystem); None when it is not there."""
    filesystem, root = fs.resolve(path)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return None
    files = [root] if info.type == pafs.FileType.File else fs.list_files(path, recursive=True)
    h = hashlib.sha256()
    for name in files:
        h.update(posixpath.relpath(name, root).encode())
        with filesystem.open_input_stream(name) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def _files_digest(*folders: Path) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*")):
            if path.suffix in (".j2", ".yaml"):
                h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(cfg, stage: Stage) -> dict:
    sections = {key: OmegaConf.select(cfg, key) for key in stage.config_keys}
    folders = [prompts.TEMPLATE_DIR, scenarios.BUILTIN_DIR]
    if cfg.scenarios_dir:
        folders.append(Path(cfg.scenarios_dir))
    inputs = {}
    for name in stage.inputs:
        manifest = StageStore(cfg.run_dir, name).manifest()
        if manifest is None:
            raise FileNotFoundError(f"stage {stage.name!r} needs the output of {name!r}; run it first")
        inputs[name] = manifest["digest"]
    data = {path: content_digest(path) for path in (stage.reads(cfg) if stage.reads else [])}
    return {"config": digest(sections), "inputs": inputs, "files": _files_digest(*folders), "data": data,
            "version": __version__}



def init_ray(cfg) -> None:
    import ray

    # Workers inherit these: DeepSpeed's compiled ops and the converted model are cached once per machine.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(cfg.train.torch_extensions_dir))
    configure_ray_data()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # A running cluster (or `ray job submit`, which sets RAY_ADDRESS) has its own resources. No
    # credentials go into the job's runtime env (Ray's job table and dashboard show it to anyone who
    # can list jobs): a local Ray's workers inherit this process's environment, a cluster's nodes
    # have their own (a Secret in the pods' env, or a workload identity).
    kwargs = {"address": address} if address else {"num_cpus": cfg.ray.num_cpus}
    ray.init(**kwargs, log_to_driver=True)


def configure_ray_data() -> None:
    """The driver's Ray Data settings, which every plan it submits carries to its workers."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = True
    # Ray Data polls each map task's memory from a thread of its own every second; with a dozen
    # batches in flight per actor that polling took ~9% of a labelling actor's CPU (py-spy), for a
    # figure the stages do not use.
    context.memory_usage_poll_interval_s = None


def run_stage(cfg, name: str, force: bool = False) -> dict:
    """Run one stage (its inputs must exist) and return its manifest.

    The driver only plans: the stage's plans read its inputs' listed parts, the workers write its own
    parts, and the manifest is written last from their footers' counts."""
    from themis_ray.console import print_stage_summary
    from themis_ray.executor import StageContext

    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    store = StageStore(cfg.run_dir, name)
    inputs = {n: StageStore(cfg.run_dir, n) for n in stage.inputs}
    return run_stored(cfg, name, store, fingerprint(cfg, stage), print_stage_summary, force=force,
                      work=lambda resume: stage.run(StageContext(cfg=cfg, store=store, inputs=inputs, resume=resume)))


def run_stored(cfg, name: str, store: StageStore, fp: dict, summary: Callable[[dict, bool], None],
               work: Callable[[bool], StageResult], force: bool = False) -> dict:
    """The runner of every stage and of `themis-ray judge`: skip the work when `store` holds a finished
    run of fingerprint `fp`; else claim the folder (a folder that is not ours is refused before Ray
    starts), begin (resuming an interrupted run of the same `fp`), run `work(resume)`, commit its
    result timed, and print `summary(manifest, skipped)`."""
    if store.is_done(fp) and not force:
        manifest = store.manifest()
        summary(manifest, True)
        return manifest
    store.claim()
    init_ray(cfg)
    resume = store.begin(fp, force=force)
    if resume:
        print(f"{name}: resuming an interrupted run; rows already written are not sent again")
    from themis_ray.executor.compact import compact

    start = time.perf_counter()
    result = work(resume)
    merged = compact(store, int(cfg.store.target_part_bytes))
    if merged:
        print(f"{name}: {merged[0]} parts compacted into {merged[1]} (store.target_part_bytes "
              f"{cfg.store.target_part_bytes})")
    manifest = store.commit(result, fp, time.perf_counter() - start)
    summary(manifest, False)
    return manifest


def engine_configs(node, path: str = ""):
    """(dotted path, engine config) for every engine block under a config node."""
    if OmegaConf.is_dict(node):
        if "kind" in node and "model" in node and "tensor_parallel_size" in node:
            yield path, node
            return
        for key in node:
            yield from engine_configs(node[key], f"{path}.{key}" if path else str(key))
    elif OmegaConf.is_list(node):
        for i, item in enumerate(node):
            yield from engine_configs(item, f"{path}[{i}]")


def preflight_engines(cfg, stages) -> None:
    """Every engine the stages will build, checked before the first stage starts (vllm: installed, GPUs)."""
    from themis_ray.engines import gpus_per_engine, preflight

    engines = [(where, engine) for name in stages for key in STAGES[name].config_keys
               for where, engine in engine_configs(OmegaConf.select(cfg, key), key)]
    for where, engine in engines:
        preflight(engine, where)  # installed? (the GPU check needs Ray)
    if any(gpus_per_engine(engine) for _, engine in engines):
        init_ray(cfg)
        for where, engine in engines:
            preflight(engine, where)  # now against the cluster's GPUs


def run_pipeline(cfg, force: bool = False) -> dict[str, dict]:
    names = selected(cfg)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise KeyError(f"unknown stages {unknown}; stages: {', '.join(STAGES)}")
    preflight_engines(cfg, names)  # a vllm teacher fails now, not after an hour of synthesis
    start = time.perf_counter()
    manifests = {name: run_stage(cfg, name, force=force) for name in names}
    from themis_ray.console import print_pipeline_summary

    print_pipeline_summary(cfg, manifests, time.perf_counter() - start)
    return manifests
