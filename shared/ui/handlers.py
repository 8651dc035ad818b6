"""What each tool of the QR-LoRA tab does when its button is pressed, without gradio.

Every handler takes the page's values (file names as listed, numbers, texts) and returns a
``Result``; ``qrlora.ui.layout`` maps it onto the page. The work itself is done by
``qrlora.tools`` and ``qrlora.info``, exactly as the command line does it.

Rules the handlers keep, whatever the tool:

- a ``UserError`` becomes the one sentence it carries; any other exception becomes one line,
  ``internal error: ...``, and its traceback goes to the console (``guarded``);
- an existing output is never replaced unless the user confirmed that very path
  (``confirmed``): otherwise the result asks, and nothing is written;
- a listed file that is gone by the time it is used is reported, and nothing is written.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .. import tools
from ..errors import UserError

LOG_PREFIX = "[QR-LoRA tools]"
SUFFIX = ".safetensors"


@dataclass
class Result:
    message: str
    error: bool = False
    ask: str = ""  # an output path that exists: the page asks before replacing it
    details: str = ""  # longer text (inspect, import report, similarity summary)
    image: bytes | None = None  # a PNG to show (the similarity plot)
    written: list[str] = field(default_factory=list)


def guarded(fn: Callable[..., Result]) -> Callable[..., Result]:
    @functools.wraps(fn)
    def run(*args, **kwargs) -> Result:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            return Result(str(e), error=True)
        except Exception as e:  # a bug or the machine (memory): one line here, all of it on the console
            print(f"{LOG_PREFIX} {fn.__name__} failed:", file=sys.stderr)
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            return Result(f"internal error: {type(e).__name__}: {first}".rstrip(": "), error=True)

    return run


# ----------------------------------------------------------------- files
def list_files(folder: str) -> list[str]:
    """``.safetensors`` files under ``folder`` (sub-folders included), as paths relative to it,
    sorted; hidden files and folders (atomic writes' temporary files) are left out."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.endswith(SUFFIX) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found, key=str.lower)


def existing_input(folder: str, name: str | None, what: str) -> str:
    """The path of a listed (or typed) input file, which must still be there."""
    name = (name or "").strip()
    if not name:
        raise UserError(f"choose the {what}")
    path = name if os.path.isabs(name) else os.path.join(folder, name)
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise UserError(f"{what} {path} is a folder, not a file")
        raise UserError(f"{what} {name} is no longer in {folder} (deleted or moved since the list was made); press Refresh")
    return path


def output_path(folder: str, name: str | None, what: str = "output file") -> str:
    name = (name or "").strip()
    if not name:
        raise UserError(f"give the {what}'s name")
    if not name.endswith(SUFFIX):
        name += SUFFIX
    return name if os.path.isabs(name) else os.path.join(folder, name)


def _needs_confirmation(path: str, confirmed: str | None) -> Result | None:
    """Ask before replacing ``path`` unless the user confirmed exactly this path."""
    if os.path.exists(path) and os.path.abspath(confirmed or "") != os.path.abspath(path):
        return Result(f"{path} already exists: press 'Overwrite' to replace it (nothing was written)", ask=path)
    return None


def basis_source(folder: str, basis_name: str | None, base: str | None, cache: str | None,
                 max_disagreement: float, progress=None) -> tuple[tools.BasisSource, list[str]]:
    """Q from a listed basis file, or from a base checkpoint (cached); neither: the file's own Q.
    Also the list that collects what the tool says on the way (shown with its result)."""
    basis = existing_input(folder, basis_name, "basis file") if (basis_name or "").strip() else None
    base = (base or "").strip() or None
    if basis and base:
        raise UserError("give the basis file or the base checkpoint, not both")
    if base and not os.path.exists(base):
        raise UserError(f"base checkpoint {base} does not exist")
    notes: list[str] = []
    source = tools.BasisSource(basis=basis, base=base, cache=cache, max_disagreement=float(max_disagreement),
                               limit_name="max disagreement", progress=progress, say=notes.append,
                               warn=lambda text: notes.append("warning: " + text))
    return source, notes


# ----------------------------------------------------------------- the tools
@guarded
def inspect(folder: str, name: str) -> Result:
    from ..info import describe, format_info

    path = existing_input(folder, name, "file")
    info = describe(path)
    headline = f"{name}: {info['kind']}" + (f" for {info['arch']}" if info.get("arch") else "")
    if "size_vs_lora" in info:
        headline += f", {info['size_vs_lora']:.3f}× the size of the same-rank LoRA"
    return Result(headline, details=format_info(info))


@guarded
def fuse(folder: str, names: list[str | None], weights: list[float], output: str, confirmed: str = "",
         dtype: str = "fp16") -> Result:
    items = [(existing_input(folder, n, "ΔR file"), float(w)) for n, w in zip(names, weights) if (n or "").strip()]
    if not items:
        raise UserError("choose at least one ΔR file to fuse")
    out = output_path(folder, output)
    if any(os.path.abspath(p) == os.path.abspath(out) for p, _ in items):
        raise UserError(f"the output {out} is one of the inputs; choose another name")
    ask = _needs_confirmation(out, confirmed)
    if ask:
        return ask
    return Result(tools.fuse_files(items, out, dtype), written=[out])


@guarded
def export(folder: str, name: str, to: str, basis_name: str, base: str, output: str, confirmed: str = "",
           cache: str | None = None, max_disagreement: float = 1.0, dtype: str = "fp16", progress=None) -> Result:
    path = existing_input(folder, name, "ΔR file")
    source, notes = basis_source(folder, basis_name, base, cache, max_disagreement, progress)
    out = output_path(folder, output)
    ask = _needs_confirmation(out, confirmed)
    if ask:
        return ask
    summary = tools.export_file(path, to, out, source, dtype)
    return Result(summary, details="\n".join(notes), written=[out])


@guarded
def import_official(folder: str, name: str, basis_name: str, base: str, output: str, confirmed: str = "",
                    cache: str | None = None, tolerance: float = 0.02, force: bool = False,
                    dtype: str = "fp16", progress=None) -> Result:
    path = existing_input(folder, name, "official file")
    source, notes = basis_source(folder, basis_name, base, cache, 1.0, progress)
    if not source.basis and not source.base:
        raise UserError("importing an official file needs the basis: choose a basis file or give the base checkpoint")
    out = output_path(folder, output)
    ask = _needs_confirmation(out, confirmed)
    if ask:
        return ask
    lines = tools.import_official_file(path, out, source, float(tolerance), bool(force), dtype)
    return Result(f"imported {os.path.basename(path)} -> {out}", details="\n".join(notes + lines), written=[out])


@guarded
def similarity(folder: str, a: str, b: str, basis_name: str = "", base: str = "", cache: str | None = None,
               max_disagreement: float = 1.0, progress=None) -> Result:
    from .. import similarity as sim

    path_a, path_b = existing_input(folder, a, "first file"), existing_input(folder, b, "second file")
    source, notes = basis_source(folder, basis_name, base, cache, max_disagreement, progress)
    result = tools.compare_files(path_a, path_b, source)
    fd, plot = tempfile.mkstemp(prefix="qrlora-similarity-", suffix=".png")
    os.close(fd)
    try:
        sim.plot(result, plot)
        with open(plot, "rb") as f:
            png = f.read()
    finally:
        os.remove(plot)
    means = ", ".join(f"cos({m}) mean {s['mean']:.4f}" for m, s in result["summary"].items() if s.get("count"))
    return Result(f"{len(result['layers'])} common layers: {means}", details="\n".join([*notes, sim.format_summary(result)]),
                  image=png)


@guarded
def compute_basis(checkpoint: str, rank: float, targets: str, output_folder: str, output: str, confirmed: str = "",
                  cache: str | None = None, progress=None) -> Result:
    checkpoint = (checkpoint or "").strip()
    if not checkpoint or not os.path.exists(checkpoint):
        raise UserError(f"base checkpoint {checkpoint or '(empty)'} does not exist")
    rank_value = int(rank or 0)
    if rank_value < 1 or rank_value != rank:
        raise UserError(f"rank must be a whole number of at least 1, got {rank}")
    out = output_path(output_folder, output, "basis file")
    ask = _needs_confirmation(out, confirmed)
    if ask:
        return ask
    spec = [t for t in (targets or "").split() if t]
    chosen = None if not spec else spec[0] if len(spec) == 1 else spec
    return Result(tools.compute_basis(checkpoint, rank_value, out, chosen, cache=cache, progress=progress), written=[out])


@guarded
def check_basis(folder: str, basis_name: str, checkpoint: str, cache: str | None = None,
                max_disagreement: float = 1.0, progress=None) -> Result:
    path = existing_input(folder, basis_name, "basis file")
    checkpoint = (checkpoint or "").strip()
    if not checkpoint or not os.path.exists(checkpoint):
        raise UserError(f"base checkpoint {checkpoint or '(empty)'} does not exist")
    check = tools.check_basis_file(path, checkpoint, cache, max_disagreement=float(max_disagreement), progress=progress)
    return Result(("match: " if check.ok else "no match: ") + check.summary, details="\n".join(check.details))
