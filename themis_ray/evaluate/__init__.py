"""Meta-evaluation: judges measured against gold labels, side by side, with a report.

- `judges`: `evaluate.judges` specs -> judges (a name, an engine config, whether to prefill the score)
- `benchmarks`: the validation split, a labelled user file (pointwise or pairwise), MT-Bench
- `field`: RewardBench 2, JudgeBench, MT-Bench human judgments and HHH from their published files,
  each scored by its authors' rule, with random and always-longer baselines
- `grading`: a judge grades a benchmark's records on a Ray Data actor pool
- `metrics`: the metrics themselves (pure numpy/scipy)
- `results`: graded records -> headline metrics, CIs, normalised aggregate, per scenario, metrics.json
- `report`: plots, text tables and the static report.html
"""
