"""The pipeline's stages, in the order they run: the one list that `themis_ray.pipeline`, the CLI and
the job entrypoints read.

Adding a stage: its module under `themis_ray/stages/` (a `run(ctx) -> StageResult`), its config section
in `themis_ray/config.py`, and one `Stage(...)` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from themis_ray import fs
from themis_ray.stages import classify, curate, evaluate, ifd, label, prefer, respond, synthesize, train


def _trained_classifier(cfg) -> list[str]:
    """classify reads the trained classifier's folder when it routes with it: retraining re-runs it."""
    if cfg.classify.method != "trained":
        return []
    return [cfg.classify.model or fs.join(cfg.run_dir, "classifier")]


def _benchmark_files(cfg) -> list[str]:
    """evaluate reads the labelled file and the field's benchmark files it names, and the prefer stage's
    manifest when it runs: new data or a new preference-tuned judge re-runs it."""
    from themis_ray.evaluate.field import FIELD

    names = [n for n in cfg.evaluate.benchmarks if n == "file" or n in FIELD]
    files = [cfg.evaluate[n].path for n in names if cfg.evaluate[n].path]
    if cfg.prefer.enabled:  # the preference-tuned judge is graded too: a new one re-runs evaluate
        files.append(fs.join(cfg.run_dir, "prefer", "_manifest.json"))
    return files


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # run(ctx: StageContext) -> StageResult
    inputs: tuple[str, ...]
    config_keys: tuple[str, ...]  # the config sections whose change invalidates the stage
    # Files or folders (beyond input stages) whose content the stage reads: a change re-runs it.
    reads: Optional[Callable] = None


STAGES = {
    s.name: s
    for s in (
        Stage("synthesize", synthesize.run, (), ("corpus", "synthesize", "scenarios_dir")),
        Stage("classify", classify.run, ("synthesize",), ("classify", "scenarios_dir"), reads=_trained_classifier),
        Stage("respond", respond.run, ("classify",), ("respond",)),
        Stage("label", label.run, ("respond",), ("label", "scenarios_dir")),
        Stage("ifd", ifd.run, ("label",), ("ifd",)),
        Stage("curate", curate.run, ("ifd",), ("curate",)),
        Stage("train", train.run, ("curate",), ("train",)),
        # DPO on the trained judge's mistakes; in a pipeline only when prefer.enabled.
        Stage("prefer", prefer.run, ("curate", "train"), ("prefer", "train", "scenarios_dir")),
        Stage("evaluate", evaluate.run, ("curate", "train"), ("evaluate", "train.model"), reads=_benchmark_files),
    )
}


OPTIONAL = {"prefer": lambda cfg: bool(cfg.prefer.enabled)}  # stages a pipeline runs only when switched on


def selected(cfg) -> list[str]:
    """The stages a pipeline run covers: the config's `stages`, or every stage when it names none
    (an optional stage only when its config switches it on)."""
    return list(cfg.stages) or [s for s in STAGES if OPTIONAL.get(s, lambda _: True)(cfg)]
