"""Which judges an evaluation compares: `evaluate.judges` specs -> a name, an engine and a prefill flag.

"trained" is this run's fine-tuned judge (`<run_dir>/train/judge`), "base" is the model it was
fine-tuned from (`train.model`), "preferred" the judge the prefer stage tuned from "trained"
(`<run_dir>/prefer/judge`; added by itself when `prefer.enabled`, so base, SFT and preference-tuned
judges are graded side by side); any other name is a model folder unless the spec names its model or
its own engine, e.g. an OpenAI-compatible endpoint such as the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from themis_ray import fs
from themis_ray.store import StageStore
from themis_ray.config import EngineConfig, JudgeSpec
from themis_ray.engines import continues_assistant_message, engine_label


@dataclass
class Judge:
    name: str
    engine: Any  # an EngineConfig (DictConfig), model set
    prefill: bool  # continue an assistant message that reads "[[" so the first token is the score

    @property
    def label(self) -> str:
        return engine_label(self.engine, full_path=True)


def _spec(entry: Any) -> Any:
    """A JudgeSpec config from a spec, a mapping or a bare name (as tests and callers may pass)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    return OmegaConf.merge(OmegaConf.structured(JudgeSpec), entry)


PREFERRED = "preferred"


def _with_preferred(cfg, run_dir: str) -> list:
    """evaluate.judges, plus the preference-tuned judge when the prefer stage tuned one this run."""
    entries = list(cfg.evaluate.judges)
    if not cfg.prefer.enabled or any(_spec(e).name == PREFERRED for e in entries):
        return entries
    manifest = StageStore(run_dir, "prefer").manifest()
    if manifest is None or not manifest.get("optimised"):
        print("evaluate: the prefer stage found no mistakes to learn from, so there is no preference-tuned "
              "judge to grade" if manifest else "evaluate: prefer has not run; grading without its judge")
        return entries
    return entries + [PREFERRED]


def resolve_judges(cfg, run_dir: str | Path | None = None) -> list[Judge]:
    """Every judge of `cfg.evaluate.judges` (and "preferred", see above), resolved; names must be unique."""
    run_dir = str(run_dir if run_dir is not None else cfg.run_dir)
    judges = []
    for entry in _with_preferred(cfg, run_dir):
        spec = _spec(entry)
        if not spec.name or not str(spec.name).strip():
            raise ValueError("evaluate.judges: every judge needs a name")
        base = spec.engine if spec.engine is not None else cfg.evaluate.engine
        engine = OmegaConf.merge(OmegaConf.structured(EngineConfig), base)
        if spec.model:
            model = spec.model
        elif spec.name == "trained":
            model = fs.join(run_dir, "train", "judge")
        elif spec.name == "base":
            model = cfg.train.model
        elif spec.name == PREFERRED:
            model = fs.join(run_dir, "prefer", "judge")
        elif spec.engine is not None:
            model = engine.model
        else:
            model = spec.name
        engine.model = model
        if spec.prefill_score is not None:
            prefill = bool(spec.prefill_score)
        else:
            # A remote API does not continue an assistant message: parse the score from the text.
            prefill = bool(cfg.evaluate.prefill_score) and continues_assistant_message(engine)
        judges.append(Judge(name=str(spec.name), engine=engine, prefill=prefill))
    names = [j.name for j in judges]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"evaluate.judges: names must be unique; repeated: {', '.join(duplicates)}")
    if not judges:
        raise ValueError("evaluate.judges is empty: name at least one judge")
    return judges
