"""The tools behind ``qrlora`` and ``qrlora ui``: each takes plain values, does the work and
returns what it did (a summary, a report); the command line prints it, the UI shows it.

Messages about the basis name the option the user set (``BasisSource.limit_name``), so the
same sentence fits a command line and a page.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .checkpoint import STORAGE_DTYPES
from .errors import IncompatibleFiles, UserError
from .paths import basis_cache_dir

Progress = Callable[[int, int, str], None]  # (layers done, layers total, current layer)


def _say(text: str) -> None:
    print(text)


def _warn(text: str) -> None:
    print("warning: " + text, file=sys.stderr)


@dataclass
class BasisSource:
    """Where Q comes from: a basis file, or a base checkpoint (computed once, then cached)."""

    basis: str | None = None
    base: str | None = None
    cache: str | None = None
    device: str = "auto"
    max_disagreement: float = 1.0  # percent
    limit_name: str = "--max-disagreement"
    progress: Progress | None = None
    say: Callable[[str], None] = _say  # what was done (cache hit, computed)
    warn: Callable[[str], None] = _warn  # accepted, but worth knowing

    def describe(self) -> str:
        return self.basis or f"the basis of {self.base}"


def load_or_compute_basis(source: BasisSource, rank: int | None, names=None, arch=None):
    """The basis from ``source.basis``, or computed (cached) from ``source.base``."""
    from .basis import BasisCache, load_basis

    if source.basis:
        return load_basis(source.basis)
    if source.base:
        if not rank:
            raise UserError("--base needs the rank (from the ΔR file, or --rank)")
        cache = BasisCache(source.cache or basis_cache_dir())
        basis, hit = cache.get_or_compute(source.base, rank, names, arch, device=source.device, progress=source.progress)
        source.say(f"basis {basis.basis_id} {'from cache' if hit else 'computed'} ({cache.path_for(basis.basis_id)})")
        return basis
    raise UserError("give the basis: --basis BASIS.safetensors or --base CHECKPOINT.safetensors")


def q_for(source: BasisSource, d, path: str):
    """Q per layer for the ΔR file ``d`` read from ``path``, checked against the file's own
    basis id, rank, layers and sketch."""
    from .basis import check_basis

    limit = source.max_disagreement / 100.0
    limit_text = f"limit {source.limit_name} {source.max_disagreement:g} %"
    if d.q:  # embedded: measured against the file's own sketch all the same (a matching id is no proof)
        check = check_basis(d.names, d.sketch, d.basis_id, d.q, d.basis_id, limit)
        if not check.ok:
            raise IncompatibleFiles(f"{path}: the embedded {check.describe()} ({limit_text})")
        return d.q
    basis = load_or_compute_basis(source, d.rank, names=list(d.layers), arch=d.arch)
    where = source.describe()
    if basis.rank != d.rank:
        raise IncompatibleFiles(f"{path} has rank {d.rank} but {where} has rank {basis.rank}; use a rank-{d.rank} basis")
    missing = [n for n in d.layers if n not in basis.q]
    if missing:
        raise IncompatibleFiles(f"{where} lacks {len(missing)} of the {len(d.layers)} layers of {path} (first: {missing[0]})")
    for n in d.layers:
        if tuple(basis.q[n].shape) != (d.targets[n].shape[0], d.rank):
            raise IncompatibleFiles(f"layer {n}: Q in {where} is {tuple(basis.q[n].shape)}, but {path} needs"
                                    f" ({d.targets[n].shape[0]}, {d.rank})")
    if basis.basis_id != d.basis_id and d.sketch is None:
        raise IncompatibleFiles(f"{where} ({basis.basis_id}) is not the basis of {path} ({d.basis_id}), and the file"
                                " has no sketch to measure the difference")
    # measured whatever the ids say: a stale or altered basis can carry the right id
    check = check_basis(d.names, d.sketch, d.basis_id, basis.q, basis.basis_id, limit)
    if not check.ok:
        raise IncompatibleFiles(check.describe() + f" ({limit_text})")
    if not check.same_id:
        source.warn(check.describe())
    return basis.q


# ----------------------------------------------------------------- the tools
def compute_basis(checkpoint: str, rank: int, output: str, targets=None, arch: str | None = None,
                  cache: str | None = None, device: str = "auto", dtype: str = "fp32",
                  progress: Progress | None = None) -> str:
    from .basis import BasisCache, basis_from_checkpoint, save_basis

    started = time.perf_counter()
    if cache:
        basis, hit = BasisCache(cache).get_or_compute(checkpoint, rank, targets, arch, device=device, progress=progress)
    else:
        basis, hit = basis_from_checkpoint(checkpoint, rank, targets, arch, device=device, progress=progress), False
    save_basis(basis, output, STORAGE_DTYPES[dtype])
    return (f"{basis.basis_id}: {len(basis.targets)} layers at rank {basis.rank}"
            f" ({'cache hit' if hit else 'computed'} in {time.perf_counter() - started:.1f}s) -> {output}")


@dataclass
class BasisFileCheck:
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


def check_basis_file(basis_path: str, checkpoint: str, cache: str | None = None, device: str = "auto",
                     max_disagreement: float = 1.0, progress: Progress | None = None) -> BasisFileCheck:
    """Is ``basis_path`` the basis of ``checkpoint``? Its Q is measured against the sketch it
    carries (is the file intact?), then against the basis of the checkpoint at its rank and on
    its layers (computed once, then cached)."""
    from .basis import BasisCache, check_basis, load_basis

    given = load_basis(basis_path)
    limit = max_disagreement / 100.0
    details = []
    if given.stored_sketch is not None:
        intact = check_basis(given.names, given.stored_sketch, given.basis_id, given.q, given.basis_id, limit)
        details.append(f"the file's Q against its own sketch: {'intact' if intact.ok else intact.describe()}")
        if not intact.ok:
            return BasisFileCheck(False, f"{basis_path} is damaged or altered: {intact.describe()}", details)
    truth, hit = BasisCache(cache or basis_cache_dir()).get_or_compute(
        checkpoint, given.rank, given.names, given.arch, device=device, progress=progress)
    details.append(f"basis of {os.path.basename(checkpoint)} at rank {given.rank}: {truth.basis_id}"
                   f" ({'from cache' if hit else 'computed'})")
    measured = check_basis(truth.names, truth.sketch(), truth.basis_id, given.q, given.basis_id, limit)
    if measured.same_id and measured.ok:
        return BasisFileCheck(True, f"{basis_path} is the basis of {checkpoint} ({given.basis_id})", details)
    return BasisFileCheck(False, f"{basis_path} ({given.basis_id}) is not the basis of {checkpoint}"
                          f" ({truth.basis_id}): {measured.describe()}", details)


def fuse_files(items: Sequence[tuple[str, float]], output: str, dtype: str = "fp16", name: str | None = None) -> str:
    """items: (ΔR file, λ). Writes Σλ·ΔR (refusing files on different bases or masks)."""
    from . import deltar
    from .fusion import fuse

    loaded = [(path, deltar.load(path), weight) for path, weight in items]
    fused = fuse(loaded)
    name = name or os.path.splitext(os.path.basename(output))[0]
    fused.metadata["qrlora.fused_from"] = json.dumps([[os.path.basename(p), w] for p, _, w in loaded])
    deltar.save(fused, output, STORAGE_DTYPES[dtype], output_name=name, base_model=fused.metadata.get("ss_sd_model_name", ""))
    return f"fused {len(loaded)} files ({', '.join(f'{os.path.basename(p)}×{w:g}' for p, _, w in loaded)}) -> {output}"


def export_file(path: str, to: str, output: str, source: BasisSource, dtype: str = "fp16") -> str:
    from . import deltar, export
    from .checkpoint import save_atomic

    if to not in ("kohya", "diffusers"):
        raise UserError(f"export format must be kohya or diffusers, got {to!r}")
    d = deltar.load(path)
    q = q_for(source, d, path)
    convert = export.to_kohya if to == "kohya" else export.to_diffusers
    tensors, meta = convert(d, q, STORAGE_DTYPES[dtype])
    if source.base and not meta.get("ss_sd_model_name") and to == "kohya":
        meta["ss_sd_model_name"] = os.path.basename(source.base)
    save_atomic(tensors, output, meta, model_hash=True)
    return f"exported {len(d.layers)} layers as a {to} LoRA ({len(tensors)} tensors) -> {output}"


def import_official_file(path: str, output: str, source: BasisSource, tolerance: float = 0.02,
                         force: bool = False, dtype: str = "fp16") -> list[str]:
    """The lines of the import report, the last naming the file written."""
    from . import deltar
    from .official import import_official, read_official

    arch, layers = read_official(path)
    rank = next(iter(layers.values()))["delta_r"].shape[0]
    basis = load_or_compute_basis(source, rank, names=list(layers), arch=arch)
    d, report = import_official(path, basis, tolerance=tolerance, force=force)
    name = os.path.splitext(os.path.basename(output))[0]
    deltar.save(d, output, STORAGE_DTYPES[dtype], output_name=name, base_model=os.path.basename(source.base) if source.base else "")
    lines = [report.summary()]
    for layer in (report.moved or report.mismatched)[:20]:
        lines.append(f"  {layer.name}: stored Q differs by {layer.q_error:.2%}; ΔW moved {layer.dw_error:.2%}")
    return lines + [f"-> {output}"]


def compare_files(a: str, b: str, source: BasisSource | None = None) -> dict:
    """Per-layer cosines (``qrlora.similarity.compare``), with Q from ``source`` when needed."""
    from . import similarity

    source = source or BasisSource()
    return similarity.compare(a, b, q_for=lambda path, d: q_for(source, d, path))
