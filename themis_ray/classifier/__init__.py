"""Scenario classification: which of the scenarios an instruction belongs to.

- `zero_shot`: the model scores every scenario name as the answer (a constrained choice by
  log-probability, optionally calibrated); any engine that scores text.
- `trained`: a small encoder fine-tuned on labelled instructions (`themis-ray train-classifier`) and
  its `ScenarioModel` for prediction.

Used by the classify stage, the judge server and `themis-ray judge` for rows without a scenario.
"""


def predictor_engine(classify_cfg, key: str):
    """The engine a `ScenarioPredictor` for this `classify` section builds, named by `key` in errors,
    as an executor step declares it; None for a trained classifier (it builds no engine)."""
    from themis_ray.executor.step import StepEngine

    return None if classify_cfg.method == "trained" else StepEngine(classify_cfg.engine, key, scores=True)


class ScenarioPredictor:
    """One instruction -> (scenario, confidence), by a trained classifier folder (`model_dir`) or
    zero-shot with the engine of `engine_cfg`; built once per actor."""

    def __init__(self, engine_cfg, scenarios_dir=None, model_dir=None):
        self.scenarios_dir = scenarios_dir
        if model_dir:
            from themis_ray.classifier.trained import ScenarioModel

            self.trained, self.engine = ScenarioModel(model_dir, scenarios_dir, num_threads=engine_cfg.num_threads), None
        else:
            from themis_ray.engines import build_engine

            self.trained, self.engine = None, build_engine(engine_cfg)

    def predict(self, instruction: str) -> tuple[str, float]:
        if self.trained is not None:
            return self.trained.predict([instruction])[0]
        from themis_ray.classifier.zero_shot import classify

        return classify(self.engine, [instruction], self.scenarios_dir)[0]
