"""The `qrlora` command (also `python -m qrlora`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import __version__

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class CliError(Exception):
    pass


def default_cache_dir() -> str:
    """Bases live in ``$QRLORA_CACHE/basis`` (default ``~/.cache/qrlora/basis``)."""
    root = os.environ.get("QRLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qrlora")
    return os.path.join(root, "basis")


class ProgressBar:
    """One line on stderr, redrawn in place: layers done, total, rate, current layer."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream, self.start = label, stream, time.perf_counter()

    def __call__(self, done: int, total: int, current: str = "") -> None:
        width = 30
        filled = int(width * done / max(1, total))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, done) * (total - done)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s eta {eta:.0f}s {current[-40:]:<40}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _parse_weighted(item: str) -> tuple[str, float]:
    path, sep, weight = item.rpartition(":")
    if sep and path and not os.path.exists(item):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def _basis_for(args, names=None, arch=None):
    """The basis from --basis FILE or computed (cached) from --base CHECKPOINT."""
    from .basis import BasisCache, load_basis

    if getattr(args, "basis", None):
        return load_basis(args.basis)
    if getattr(args, "base", None):
        if not getattr(args, "rank", None):
            raise CliError("--base needs the rank (from the ΔR file, or --rank)")
        cache = BasisCache(args.cache or default_cache_dir())
        basis, hit = cache.get_or_compute(args.base, args.rank, names, arch, device=args.device,
                                          progress=ProgressBar("basis"))
        print(f"basis {basis.basis_id} {'from cache' if hit else 'computed'} ({cache.path_for(basis.basis_id)})")
        return basis
    raise CliError("give the basis: --basis BASIS.safetensors or --base CHECKPOINT.safetensors")


def _q_for(args, d):
    """Q per layer for a ΔR file, checked against the file's own basis id and sketch."""
    from .basis import agreement

    if d.q:
        return d.q
    args.rank = d.rank
    basis = _basis_for(args, names=list(d.layers), arch=d.arch)
    if basis.basis_id != d.basis_id:
        if d.sketch is None:
            raise CliError(f"basis {basis.basis_id} is not the file's basis {d.basis_id}, and the file has no sketch to compare")
        agree = agreement(d.names, d.sketch, basis.q)
        message = f"basis {basis.basis_id} is not the training basis {d.basis_id}: {agree.describe()}"
        if agree.missing or agree.max > args.max_disagreement:
            raise CliError(message + f" (limit --max-disagreement {args.max_disagreement:.2%})")
        print("warning: " + message, file=sys.stderr)
    return basis.q


# ----------------------------------------------------------------- commands
def cmd_make_tiny(args) -> None:
    from .tiny import make_tiny

    tiny = make_tiny(args.arch, args.output, seed=args.seed)
    print(f"wrote {tiny.checkpoint}")
    for what, path in tiny.extra_files.items():
        print(f"wrote {path} ({what})")
    print(f"diffusers configs in {tiny.config_dir}")


def cmd_basis(args) -> None:
    from .basis import BasisCache, basis_from_checkpoint, save_basis

    targets = args.targets if args.targets is None or len(args.targets) > 1 else args.targets[0]
    started = time.perf_counter()
    if args.cache:
        basis, hit = BasisCache(args.cache).get_or_compute(args.checkpoint, args.rank, targets, args.arch,
                                                           device=args.device, progress=ProgressBar("basis"))
    else:
        basis, hit = basis_from_checkpoint(args.checkpoint, args.rank, targets, args.arch, device=args.device,
                                           progress=ProgressBar("basis")), False
    save_basis(basis, args.output, DTYPES[args.dtype])
    print(f"{basis.basis_id}: {len(basis.targets)} layers at rank {basis.rank}"
          f" ({'cache hit' if hit else 'computed'} in {time.perf_counter() - started:.1f}s) -> {args.output}")


def cmd_fuse(args) -> None:
    from . import deltar
    from .fusion import fuse

    items = []
    for spec in args.files:
        path, weight = _parse_weighted(spec)
        items.append((path, deltar.load(path), weight))
    fused = fuse(items)
    name = args.name or os.path.splitext(os.path.basename(args.output))[0]
    fused.metadata["qrlora.fused_from"] = json.dumps([[os.path.basename(p), w] for p, _, w in items])
    deltar.save(fused, args.output, DTYPES[args.dtype], output_name=name)
    print(f"fused {len(items)} files ({', '.join(f'{os.path.basename(p)}×{w:g}' for p, _, w in items)}) -> {args.output}")


def cmd_export(args) -> None:
    from . import deltar, export
    from .checkpoint import save_atomic

    d = deltar.load(args.file)
    q = _q_for(args, d)
    convert = export.to_kohya if args.to == "kohya" else export.to_diffusers
    tensors, meta = convert(d, q, DTYPES[args.dtype])
    save_atomic(tensors, args.output, meta)
    print(f"exported {len(d.layers)} layers as a {args.to} LoRA ({len(tensors)} tensors) -> {args.output}")


def cmd_import_official(args) -> None:
    from . import deltar
    from .official import import_official, read_official

    arch, layers = read_official(args.file)
    args.rank = next(iter(layers.values()))["delta_r"].shape[0]
    basis = _basis_for(args, names=list(layers), arch=arch)
    d, report = import_official(args.file, basis, tolerance=args.tolerance)
    name = os.path.splitext(os.path.basename(args.output))[0]
    deltar.save(d, args.output, DTYPES[args.dtype], output_name=name)
    print(report.summary())
    for layer in report.mismatched[:20]:
        print(f"  {layer.name}: stored Q differs by {layer.q_error:.2%}; ΔW moved {layer.dw_error:.2%}")
    print(f"-> {args.output}")


def cmd_similarity(args) -> None:
    from . import similarity

    result = similarity.compare(args.a, args.b)
    print(similarity.format_summary(result))
    if args.json:
        similarity.save_json(result, args.json)
        print(f"per-layer values -> {args.json}")
    if args.plot:
        similarity.plot(result, args.plot)
        print(f"plot -> {args.plot}")


def cmd_inspect(args) -> None:
    from .info import describe, format_info

    info = describe(args.file)
    print(json.dumps(info, indent=1) if args.json else format_info(info))


# ----------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qrlora", description="QR-LoRA tools: bases, ΔR files, fusion, export, import.")
    p.add_argument("--version", action="version", version=f"qrlora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def basis_source(sp, rank=False):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--basis", help="basis file (qrlora basis ...)")
        g.add_argument("--base", help="base checkpoint to compute the basis from (cached)")
        sp.add_argument("--cache", help=f"basis cache folder (default {default_cache_dir()}, i.e. $QRLORA_CACHE/basis)")
        sp.add_argument("--device", default="auto", help="where to compute a basis: auto, cpu, cuda")
        sp.add_argument("--max-disagreement", type=float, default=0.01,
                        help="largest measured basis disagreement accepted when the basis id differs (default 1%%)")

    sp = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the original layout")
    sp.add_argument("--arch", choices=["sdxl", "flux"], required=True)
    sp.add_argument("-o", "--output", required=True, help="output folder")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_make_tiny)

    sp = sub.add_parser("basis", help="precompute the basis of a checkpoint")
    sp.add_argument("checkpoint")
    sp.add_argument("--arch", choices=["sdxl", "flux"], help="default: detected from the file")
    sp.add_argument("--rank", type=int, required=True)
    sp.add_argument("--targets", nargs="+", help="preset (sdxl-all, sdxl-attn, sdxl-te, flux-official, ...) or patterns")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--cache", help="also keep it in this cache folder (and reuse it from there)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="storage dtype of Q (fp32 keeps it exact)")
    sp.set_defaults(func=cmd_basis)

    sp = sub.add_parser("fuse", help="fuse ΔR files: FILE[:λ] ... -> one ΔR file")
    sp.add_argument("files", nargs="+", metavar="FILE[:λ]")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--name", help="output name in the metadata (default: file name)")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    sp.set_defaults(func=cmd_fuse)

    sp = sub.add_parser("export", help="write a ΔR file as a standard LoRA")
    sp.add_argument("file")
    sp.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    basis_source(sp)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("import-official", help="convert an official QR-LoRA file to a ΔR file")
    sp.add_argument("file")
    basis_source(sp)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--tolerance", type=float, default=0.02, help="stored-Q difference reported as a mismatch (default 2%%)")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    sp.set_defaults(func=cmd_import_official)

    sp = sub.add_parser("similarity", help="per-layer cosine similarity of two adapters")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--json", help="write per-layer values and statistics here")
    sp.add_argument("--plot", help="write a PNG plot here")
    sp.set_defaults(func=cmd_similarity)

    sp = sub.add_parser("inspect", help="describe a ΔR, basis, LoRA, official or checkpoint file")
    sp.add_argument("file")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    from .checkpoint import FileFormatError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, FileFormatError, ValueError, RuntimeError) as e:
        print(f"qrlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
