"""What a person reads at the end of each stage and of the pipeline."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
_SHOWN = ("instructions_by_scenario", "agreement_with_synthesis", "responders", "prompt_tokens",
          "completion_tokens", "splits", "rejected_by_rule", "augmented", "score_histogram", "injection_shift",
          "engine", "score_histogram_by_responder", "duplicates", "methods_by_scenario")


def print_stage_summary(manifest: dict, skipped: bool) -> None:
    title = f"{manifest['stage']}" + (" (skipped: up to date)" if skipped else "")
    table = Table(title=title, show_header=True, title_justify="left")
    for col in ("rows in", "rows out", "rejected", "wall s"):
        table.add_column(col, justify="right")
    table.add_row(str(manifest["rows_in"]), str(manifest["rows_out"]), str(manifest["rows_rejected"]),
                  f"{manifest['wall_s']:.1f}")
    console.print(table)
    for key in _SHOWN:
        if manifest.get(key) not in (None, {}, []):
            console.print(f"  {key}: {manifest[key]}")
    if "train" in manifest:
        t = manifest["train"]
        resumed = f" (resumed from step {t['resumed_from_step']})" if t.get("resumed_from_step") else ""
        console.print(f"  train: steps={t.get('steps')}{resumed} loss {_fmt(t.get('first_loss'))} -> "
                      f"{_fmt(t.get('final_loss'))}, {_fmt(t.get('tokens_per_s'))} tokens/s, "
                      f"packing efficiency {_fmt(t.get('packing_efficiency'))}")
    if manifest.get("metrics"):
        bench = manifest.get("metrics_benchmark") or "validation"
        gold = "teacher labels" if bench == "validation" else "gold labels"
        metrics = Table(title=f"judges vs {gold} ({bench}; report.html has every benchmark)", title_justify="left")
        rows = manifest["metrics"]
        pairwise = any("accuracy_without_ties" in m for m in rows.values())
        # agreement is Agr(2,2); aggregate: metrics normalised so random guessing is 0 and perfect is 1
        cols = (["n", "parse_rate", "accuracy", "accuracy_without_ties", "position_consistency", "aggregate"]
                if pairwise else ["n", "parse_rate", "mae", "agreement", "accuracy", "aggregate"])
        metrics.add_column("judge")
        for c in cols:
            metrics.add_column(c, justify="right")
        for judge, m in rows.items():
            metrics.add_row(judge, *[_fmt_ci(m, c) for c in cols])
        console.print(metrics)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _fmt_ci(metrics: dict, key: str) -> str:
    """A metric, with its bootstrap interval where there is one: 0.512 [0.43, 0.60]."""
    ci = metrics.get(f"{key}_ci")
    text = _fmt(metrics.get(key))
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, float) for v in ci):
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def print_pipeline_summary(cfg, manifests: dict[str, dict], wall_s: float) -> None:
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    table = Table(title=f"pipeline finished in {wall_s:.0f} s: {run_dir}", title_justify="left")
    for col, justify in (("stage", "left"), ("in", "right"), ("out", "right"), ("rejected", "right"),
                         ("wall s", "right"), ("output", "left")):
        table.add_column(col, justify=justify)
    for name, m in manifests.items():
        table.add_row(name, str(m["rows_in"]), str(m["rows_out"]), str(m["rows_rejected"]),
                      f"{m['wall_s']:.1f}", str(run_dir / name))
    console.print(table)
    judge = run_dir / "train" / "judge"
    if judge.is_dir():
        console.print(f"trained judge: {judge}")
        console.print(f"serve it:      themis-ray serve --config <config> serve.model={judge}")
    metrics = run_dir / "evaluate" / "metrics.json"
    if metrics.is_file():
        console.print(f"metrics:       {metrics}")
    report = run_dir / "evaluate" / "report.html"
    if report.is_file():
        console.print(f"report:        {report}")
