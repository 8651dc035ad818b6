"""``python -m trainer.lab pretrain --out examples/lab/lab-base.safetensors``: see docs/lab.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _yes_no(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def main(argv=None) -> int:
    from qrlora.errors import UserError

    from .pretrain import Recipe, pretrain, reevaluate

    parser = argparse.ArgumentParser(prog="python -m trainer.lab")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the lab base model on the procedural world")
    p.add_argument("--out", required=True, help="the SGM .safetensors to write (configs go into config/ beside it)")
    for f in dataclasses.fields(Recipe):
        kind = _yes_no if isinstance(f.default, bool) else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    e = sub.add_parser("evaluate", help="score a lab base again (recipe from its .json report) and update the report")
    e.add_argument("checkpoint")
    for name, what in (("concept-data", "write an adapter's concept data set (PNG + captions) and its sample prompts"),
                       ("concept-score", "score the first and last step's samples of a concept's training run")):
        c = sub.add_parser(name, help=what)
        c.add_argument("--kind", choices=("pattern", "shape"), required=True)
        c.add_argument("--value", required=True, help="the new pattern or shape, e.g. striped or star")
        if name == "concept-data":
            c.add_argument("--out", required=True, help="the image folder to write")
            c.add_argument("--images", type=int, default=48)
            c.add_argument("--prompts", type=int, default=16)
            c.add_argument("--seed", type=int, default=0)
        else:
            c.add_argument("--samples", required=True, help="the run's sample/ folder")
            c.add_argument("--prompt-file", required=True)
    # --- study: the merge study (trainer/lab/study.py) ---
    st = sub.add_parser("study", help="train content and style adapters as QR-LoRA and LoRA, merge them, score")
    st.add_argument("--config", required=True, help="the study TOML, e.g. examples/lab/study.toml")
    st.add_argument("--out", required=True, help="folder for adapters, study.json, study.md, study.png")
    # --- end study ---
    args = parser.parse_args(argv)
    try:
        if args.command == "study":  # --- study ---
            from .study import run_study

            report = run_study(args.config, args.out, say=lambda m: print(m, flush=True))
            print(json.dumps({"out": args.out, "seconds": report["seconds"]}))
            return 0  # --- end study ---
        if args.command == "concept-data":
            from .concept import write_dataset

            print(write_dataset(args.out, args.kind, args.value, args.images, args.prompts, args.seed))
            return 0
        if args.command == "concept-score":
            from .concept import score_samples

            print(json.dumps(score_samples(args.samples, args.prompt_file, args.kind, args.value)))
            return 0
        if args.command == "evaluate":
            report = reevaluate(args.checkpoint)
        else:
            recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
            report = pretrain(args.out, recipe, say=lambda m: print(m, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report.get(k) for k in ("heldout", "vocabulary_max_cosine", "word_mixing", "train_seconds", "load_average")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
