"""The `qrlora` command (also `python -m qrlora`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__, tools
from .checkpoint import STORAGE_DTYPES as DTYPES
from .errors import UserError
from .paths import basis_cache_dir as default_cache_dir
from .tools import BasisSource


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
    """``FILE`` or ``FILE:λ``; a file whose own name has a colon is taken whole when it exists."""
    path, sep, weight = item.rpartition(":")
    if not sep or not path or os.path.exists(item) or (len(path) == 1 and weight.startswith(("\\", "/"))):
        return item, 1.0  # no λ, an existing name with a colon, or a Windows drive letter
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"{item}: the λ after the last ':' must be a number, got {weight!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{item}: the λ after the last ':' must be a finite number, got {weight!r}")
    return path, value


def _basis_source(args) -> BasisSource:
    """Where Q comes from, as the command line gave it (--basis, --base, --cache, --device)."""
    return BasisSource(basis=getattr(args, "basis", None), base=getattr(args, "base", None),
                       cache=getattr(args, "cache", None), device=getattr(args, "device", "auto"),
                       max_disagreement=getattr(args, "max_disagreement", 1.0), progress=ProgressBar("basis"))


def _input_elements(paths) -> int:
    """About how many numbers a command reads: the inputs' sizes at two bytes a number."""
    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p) // 2
        except OSError:
            pass
    return total


# ----------------------------------------------------------------- commands
def cmd_make_tiny(args) -> None:
    from .tiny import make_tiny

    tiny = make_tiny(args.arch, args.output, seed=args.seed)
    print(f"wrote {tiny.checkpoint}")
    for what, path in tiny.extra_files.items():
        print(f"wrote {path} ({what})")
    print(f"diffusers configs in {tiny.config_dir}")


def cmd_basis(args) -> None:
    targets = args.targets if args.targets is None or len(args.targets) > 1 else args.targets[0]
    print(tools.compute_basis(args.checkpoint, args.rank, args.output, targets, args.arch, cache=args.cache,
                              device=args.device, dtype=args.dtype, progress=ProgressBar("basis")))


def cmd_fuse(args) -> None:
    print(tools.fuse_files([_parse_weighted(spec) for spec in args.files], args.output, args.dtype, args.name))


def cmd_export(args) -> None:
    print(tools.export_file(args.file, args.to, args.output, _basis_source(args), args.dtype))


def cmd_import_official(args) -> None:
    for line in tools.import_official_file(args.file, args.output, _basis_source(args), args.tolerance,
                                           args.force, args.dtype):
        print(line)


def cmd_similarity(args) -> None:
    from . import similarity

    result = tools.compare_files(args.a, args.b, _basis_source(args))
    print(similarity.format_summary(result))
    if args.json:
        similarity.save_json(result, args.json)
        print(f"per-layer values -> {args.json}")
    if args.plot:
        similarity.plot(result, args.plot)
        print(f"plot -> {args.plot}")


def cmd_ui(args) -> None:
    from .ui import launch

    if not os.path.isdir(args.dir):
        raise UserError(f"--dir {args.dir} is not a folder")
    launch(args.dir, port=args.port, host=args.host, basis_cache=args.basis_cache)


def cmd_inspect(args) -> None:
    from .info import describe, format_info

    info = describe(args.file)
    print(json.dumps(info, indent=1) if args.json else format_info(info))


# ----------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qrlora", description="QR-LoRA tools: bases, ΔR files, fusion, export, import.")
    p.add_argument("--version", action="version", version=f"qrlora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (default: 1 for small inputs, torch's default for large ones)")

    def basis_source(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--basis", help="basis file (qrlora basis ...)")
        g.add_argument("--base", help="base checkpoint (or diffusers FLUX folder) to compute the basis from (cached)")
        sp.add_argument("--cache", help=f"basis cache folder (default {default_cache_dir()}, i.e. $QRLORA_CACHE/basis)")
        sp.add_argument("--device", default="auto", help="where to compute a basis: auto, cpu, cuda")
        sp.add_argument("--max-disagreement", type=float, default=1.0, metavar="PERCENT",
                        help="largest measured basis difference accepted when the basis id differs, in percent"
                             " (default 1, like the WebUI setting)")

    sp = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the original layout")
    sp.add_argument("--arch", choices=["sdxl", "flux"], required=True)
    sp.add_argument("-o", "--output", required=True, help="output folder")
    sp.add_argument("--seed", type=int, default=0)
    common(sp)
    sp.set_defaults(func=cmd_make_tiny, inputs=lambda a: [])

    sp = sub.add_parser("basis", help="precompute the basis of a checkpoint")
    sp.add_argument("checkpoint", help="single-file base model (.safetensors: SGM SDXL; BFL FLUX, bare, prefixed or"
                    " all-in-one, 16-bit), or a diffusers FLUX folder (pipeline or transformer)")
    sp.add_argument("--arch", choices=["sdxl", "flux"], help="default: detected from the file")
    sp.add_argument("--rank", type=int, required=True)
    sp.add_argument("--targets", nargs="+", help="preset (sdxl-all, sdxl-attn, sdxl-te, flux-official, ...) or patterns")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--cache", help="also keep it in this cache folder (and reuse it from there)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="storage dtype of Q (fp32 keeps it exact)")
    common(sp)
    sp.set_defaults(func=cmd_basis, inputs=lambda a: [a.checkpoint])

    sp = sub.add_parser("fuse", help="fuse ΔR files: FILE[:λ] ... -> one ΔR file")
    sp.add_argument("files", nargs="+", metavar="FILE[:λ]",
                    help="ΔR files on one basis, each with an optional multiplier λ (default 1), e.g. dog.safetensors:0.8")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--name", help="output name in the metadata (default: file name)")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    common(sp)
    sp.set_defaults(func=cmd_fuse, inputs=lambda a: [_parse_weighted(f)[0] for f in a.files])

    sp = sub.add_parser("export", help="write a ΔR file as a standard LoRA")
    sp.add_argument("file", help="the ΔR file to export")
    sp.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    basis_source(sp)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    common(sp)
    sp.set_defaults(func=cmd_export, inputs=lambda a: [a.file, a.basis or ""])

    sp = sub.add_parser("import-official", help="convert an official QR-LoRA file to a ΔR file")
    sp.add_argument("file", help="a file saved by the official QR-LoRA code (…lora.q/delta_r/base_r.weight keys)")
    basis_source(sp)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--tolerance", type=float, default=0.02,
                    help="largest relative change of a layer's ΔW (and stored-Q difference) accepted (default 0.02)")
    sp.add_argument("--force", action="store_true", help="write the file even when some layers' ΔW moves more than --tolerance")
    sp.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    common(sp)
    sp.set_defaults(func=cmd_import_official, inputs=lambda a: [a.file, a.basis or ""])

    sp = sub.add_parser("similarity", help="per-layer cosine similarity of two adapters")
    sp.add_argument("a", help="first adapter: a ΔR file, a LoRA (kohya or PEFT keys) or an official QR-LoRA file")
    sp.add_argument("b", help="second adapter, compared layer by layer with the first")
    sp.add_argument("--json", help="write per-layer values and statistics here")
    sp.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    basis_source(sp)
    common(sp)
    sp.set_defaults(func=cmd_similarity, inputs=lambda a: [a.a, a.b, a.basis or ""])

    sp = sub.add_parser("inspect", help="describe a ΔR, basis, LoRA, official or checkpoint file")
    sp.add_argument("file", help="any .safetensors file")
    sp.add_argument("--json", action="store_true", help="print everything as JSON, values in full")
    common(sp)
    sp.set_defaults(func=cmd_inspect, inputs=lambda a: [])

    sp = sub.add_parser("ui", help="the tools in a browser page (gradio), without a WebUI")
    sp.add_argument("--dir", default=".", help="folder whose files are listed and where outputs go (default: here)")
    sp.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--basis-cache", help=f"basis cache folder (default {default_cache_dir()})")
    common(sp)
    sp.set_defaults(func=cmd_ui, inputs=lambda a: [])
    return p


def main(argv=None) -> int:
    """Input errors (``UserError``: bad files, arguments, unwritable outputs) are one line and
    exit 2; anything else keeps its traceback (exit 1), so bugs and out-of-memory stay visible."""
    import torch

    from .threads import choose_threads

    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(choose_threads(_input_elements(p for p in args.inputs(args) if p), args.threads or 0))
        args.func(args)
    except UserError as e:
        print(f"qrlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
