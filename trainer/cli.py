"""``python -m trainer --config FILE.toml [--set section.key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import json
import sys

from qrlora.qr import masked_parameter_count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train a QR-LoRA (or a LoRA) kohya-style.")
    p.add_argument("--config", help="the training TOML (model, network, training, ..., dataset)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set training.learning_rate=5e-5")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the dataset plan, targets and step counts; load no weights")
    # --- C2: config reference ---
    p.add_argument("--help-config", action="store_true",
                   help="print every config section and key (type, default, kohya name, meaning) and exit")
    # --- end C2 ---
    return p


def dry_run(cfg) -> dict:
    """Everything knowable without loading weights."""
    from trainer import setup
    from trainer.data import TrainData
    from trainer.dataset_config import plan_summary
    from trainer.preflight import preflight

    plan = cfg.dataset_plan()
    checked = preflight(cfg, plan)  # what the run would fail on later: folders, packages, prompts, images
    data = TrainData(plan, cfg.training.seed)
    sched = setup.schedule(cfg, data)
    report = {
        "config": cfg.to_dict(),
        "dataset": plan_summary(plan),
        "buckets": [{"resolution": list(b), "samples_per_epoch": n} for b, n in data.bucket_counts()],
        "batches_per_epoch": sched.batches_per_epoch,
        "steps_per_epoch": sched.steps_per_epoch,
        "total_steps": sched.total_steps,
        "epochs": sched.epochs,
        "warnings": list(cfg.warnings) + list(plan.warnings) + checked,
    }
    targets = setup.header_targets(cfg)
    if targets is not None:
        n = cfg.network
        if n.type == "qrlora":
            params = sum(masked_parameter_count(n.rank, t.shape[1], n.mask) for t in targets)
        else:
            params = sum(n.rank * (t.shape[0] + t.shape[1]) for t in targets)
        report["targets"] = {"count": len(targets), "trainable_parameters": params,
                             "layers": [t.name for t in targets]}
    # --- H2: peak GPU memory estimate (trainer/memory.py) ---
    from trainer.memory import NoShapes, estimate, largest_bucket, settings_from_config

    try:
        report["memory"] = estimate(settings_from_config(cfg, *largest_bucket(plan, data))).to_dict()
    except NoShapes as e:
        report["memory"] = {"text": f"peak GPU memory estimate: not available ({e})"}
    # --- end H2 ---
    return report


def format_dry_run(r: dict) -> str:
    lines = ["resolved config:", json.dumps(r["config"], indent=1), "", "dataset plan:"]
    for d in r["dataset"]["datasets"]:
        lines.append(f"  {d.get('source', 'dataset')}: " + ", ".join(f"{k} {v}" for k, v in d.items()
                                                                      if not isinstance(v, (list, dict)) and k != "source"))
        for s in d.get("subsets", []):
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in s.items() if not isinstance(v, (list, dict))))
    lines.append(f"  images: {r['dataset']['images']}")  # C2: says which counts include repeats
    lines.append("  buckets (images with repeats): "  # C2: bucket counts include repeats, as kohya's
                 + ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]}: {b['samples_per_epoch']}"
                             for b in r["buckets"]))
    lines.append(f"  {r['batches_per_epoch']} batches per epoch, {r['steps_per_epoch']} steps per epoch, "
                 f"{r['total_steps']} steps in {r['epochs']} epochs")
    if "targets" in r:
        t = r["targets"]
        lines.append(f"targets: {t['count']} layers, {t['trainable_parameters']:,} trainable parameters")
    if "memory" in r:  # H2
        lines.append(r["memory"]["text"])
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 an error with its traceback (a bug, out of memory) or a training
    stopped by a non-finite loss, 2 a config or file problem (one line), 130/143 after
    SIGINT/SIGTERM with the state saved."""
    from qrlora.errors import UserError
    from trainer.config import load_config

    parser = build_parser()
    args = parser.parse_args(argv)
    # --- C2: config reference ---
    if args.help_config:
        from trainer.config import reference

        print(reference(), end="")
        return 0
    if args.config is None:
        parser.error("the following arguments are required: --config")
    # --- end C2 ---
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            print(format_dry_run(dry_run(cfg)))
            return 0
        from trainer.loop import run

        return run(cfg, args.set)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (during the load): nothing to save
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
