"""Per-layer cosine similarity between two adapters (the paper's disentanglement figure).

For ΔR files on one basis: cos of the flattened ΔR, which equals cos(ΔW₁, ΔW₂) because Q is
orthonormal and shared (files on different bases are refused: their ΔR multiply different Q).
A ΔR file and a LoRA (e.g. the trainer's ``type = "lora"`` baseline) compare through ΔW, the
ΔR file taken as the LoRA it exports to. For standard LoRAs: cos of the down (A) and up (B) matrices and of ΔW = B·A,
the latter from ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ) without forming ΔW.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Mapping

import torch

from .checkpoint import FileFormatError, SafetensorsFile, atomic_output, write_bytes_atomic
from .errors import IncompatibleFiles, UserError
from .official import SUFFIX_BASE, SUFFIX_DR, SUFFIX_Q

LORA_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def _delta_w_cos(down1, up1, down2, up2) -> float:
    d1, u1, d2, u2 = (t.double() for t in (down1, up1, down2, up2))

    def inner(ua, da, ub, db):
        return float(((ua.mT @ ub) * (da @ db.mT)).sum())

    denom = math.sqrt(max(inner(u1, d1, u1, d1), 0.0) * max(inner(u2, d2, u2, d2), 0.0))
    return inner(u1, d1, u2, d2) / denom if denom > 0 else float("nan")


def _lora_layers(keys, tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"down", "up"}} from LoRA keys (kohya's lora_down/lora_up or PEFT's lora_A/lora_B)."""
    key_set = set(keys)
    for down_suffix, up_suffix in LORA_PAIRS:
        layers = {}
        for key in keys:
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                if name + up_suffix in key_set:
                    layers[name] = {"down": tensor(key), "up": tensor(name + up_suffix)}
        if layers:
            return layers
    return {}


def _read(path: str) -> tuple[str, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(kind, {layer: {part: tensor}}, metadata) for a ΔR, official or standard LoRA file."""
    f = SafetensorsFile(path)
    kind = f.metadata.get("qrlora.kind")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    if kind == "delta_r":
        for key in f.keys:
            if key.endswith(".delta_r"):
                layers[key[: -len(".delta_r")]] = {"delta_r": f.tensor(key)}
        return "delta_r", layers, f.metadata
    if kind:
        raise FileFormatError(f"{path}: a QR-LoRA {kind} file has no adapter weights to compare")
    if any(k.endswith(SUFFIX_DR) for k in f.keys):
        for key in f.keys:
            for part, suffix in (("q", SUFFIX_Q), ("delta_r", SUFFIX_DR), ("base_r", SUFFIX_BASE)):
                if key.endswith(suffix):
                    layers.setdefault(key[: -len(suffix)], {})[part] = f.tensor(key)
        return "official", layers, f.metadata
    layers = _lora_layers(f.keys, f.tensor)
    if layers:
        return "lora", layers, f.metadata
    raise FileFormatError(f"{path}: neither a ΔR file, an official QR-LoRA file nor a LoRA (lora_down/lora_up or lora_A/lora_B)")


def _as_lora(path: str, lora_keys, q_for: Callable | None) -> dict[str, dict[str, torch.Tensor]]:
    """A ΔR file as the LoRA it exports to (up = Q, down = ΔR, in the other file's key style),
    so that it compares with a LoRA through ΔW."""
    from . import deltar, export

    d = deltar.load(path)
    if d.q:
        q = d.q
    elif q_for is None:
        raise UserError(f"comparing the ΔR file {path} with a LoRA needs its basis: give --basis BASIS or --base CHECKPOINT")
    else:
        q = q_for(path, d)
    peft = any(k.endswith(".lora_A.weight") for k in lora_keys)
    tensors, _ = (export.to_diffusers if peft else export.to_kohya)(d, q, torch.float32)
    return _lora_layers(list(tensors), tensors.__getitem__)


def compare(path_a: str, path_b: str, q_for: Callable | None = None) -> dict:
    """Per-layer cosines of two adapters. ΔR files compare directly only on one basis; a ΔR
    file and a LoRA compare through ΔW, with Q from the ΔR file or ``q_for(path, DeltaR)``."""
    kind_a, a, meta_a = _read(path_a)
    kind_b, b, meta_b = _read(path_b)
    kinds = {kind_a, kind_b}
    label, factors_comparable = kind_a, True
    if kinds == {"delta_r", "lora"}:
        if kind_a == "delta_r":
            a = _as_lora(path_a, SafetensorsFile(path_b).keys, q_for)
        else:
            b = _as_lora(path_b, SafetensorsFile(path_a).keys, q_for)
        kind_a = kind_b = "lora"
        label, factors_comparable = "delta_r+lora", False  # up = Q is not a trained factor
    elif kind_a != kind_b:
        raise IncompatibleFiles(f"cannot compare a {kind_a} file ({path_a}) with a {kind_b} file ({path_b})")
    elif kind_a == "delta_r":
        _check_same_basis(path_a, meta_a, path_b, meta_b)
    common = [n for n in a if n in b]
    if not common:
        raise IncompatibleFiles(f"{path_a} and {path_b} share no layer: they were made for different models or layer sets")
    per_metric: dict[str, dict[str, float]] = {}
    mismatched: dict[str, str] = {}
    for name in common:
        la, lb = a[name], b[name]
        if kind_a == "lora":
            out_a, in_a = la["up"].shape[0], la["down"].shape[1]
            out_b, in_b = lb["up"].shape[0], lb["down"].shape[1]
            if (out_a, in_a) != (out_b, in_b):
                mismatched[name] = f"ΔW {out_a}×{in_a} in {path_a}, {out_b}×{in_b} in {path_b}"
                continue
            per_metric.setdefault("delta_w", {})[name] = _delta_w_cos(la["down"], la["up"], lb["down"], lb["up"])
            if la["down"].shape == lb["down"].shape and la["up"].shape == lb["up"].shape and factors_comparable:
                per_metric.setdefault("down", {})[name] = _cos(la["down"], lb["down"])
                per_metric.setdefault("up", {})[name] = _cos(la["up"], lb["up"])
        else:
            compared = False
            for part in la:
                if part in lb and la[part].shape == lb[part].shape:
                    per_metric.setdefault(part, {})[name] = _cos(la[part], lb[part])
                    compared = True
            if not compared:
                shapes = {p: tuple(t.shape) for p, t in la.items()}, {p: tuple(t.shape) for p, t in lb.items()}
                mismatched[name] = f"{shapes[0]} in {path_a}, {shapes[1]} in {path_b}"
    if not per_metric:
        first = next(iter(mismatched.items()))
        raise IncompatibleFiles(f"{path_a} and {path_b}: none of their {len(common)} common layers has the same shape"
                                f" (first: {first[0]}: {first[1]})")
    return {
        "kind": label,
        "files": [path_a, path_b],
        "layers": common,
        "only_in_a": [n for n in a if n not in b],
        "only_in_b": [n for n in b if n not in a],
        "mismatched": mismatched,
        "summary": {m: _stats(v) for m, v in per_metric.items()},
        "per_layer": per_metric,
    }


def _check_same_basis(path_a: str, meta_a: dict, path_b: str, meta_b: dict) -> None:
    """cos(ΔR₁, ΔR₂) is cos(ΔW₁, ΔW₂) only when both multiply the same Q."""
    side = [(p, m.get("qrlora.basis_id", "?"), m.get("qrlora.rank", "?")) for p, m in ((path_a, meta_a), (path_b, meta_b))]
    (pa, ba, ra), (pb, bb, rb) = side
    if ba != bb:
        what = f"rank {ra} vs rank {rb}" if ra != rb else f"basis {ba} vs basis {bb}"
        raise IncompatibleFiles(
            f"cannot compare {pa} and {pb} by ΔR: they were trained on different bases ({what}), so their ΔR"
            " multiply different Q; export both with `qrlora export --to kohya` and compare the LoRAs (through ΔW)"
        )


def _stats(values: Mapping[str, float]) -> dict[str, float]:
    xs = [v for v in values.values() if not math.isnan(v)]
    if not xs:
        return {"count": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return {"count": len(xs), "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


_KIND_TITLES = {
    "delta_r": "ΔR files on one basis",
    "lora": "LoRA files",
    "official": "official QR-LoRA files",
    "delta_r+lora": "a ΔR file and a LoRA, compared through ΔW",
}


def format_summary(result: dict) -> str:
    lines = [f"{_KIND_TITLES.get(result['kind'], result['kind'])}: {len(result['layers'])} common layers"]
    if result.get("mismatched"):
        name, why = next(iter(result["mismatched"].items()))
        lines.append(f"  {len(result['mismatched'])} common layers not compared: different shapes (first: {name}: {why})")
    for metric, s in result["summary"].items():
        if s.get("count"):
            lines.append(
                f"  cos({metric}): mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}  ({s['count']} layers)"
            )
    for side in ("only_in_a", "only_in_b"):
        if result[side]:
            lines.append(f"  {len(result[side])} layers {side.replace('_', ' ')}")
    return "\n".join(lines)


def save_json(result: dict, path: str) -> None:
    write_bytes_atomic(path, json.dumps(result, indent=1).encode("utf-8"))


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None
    metrics = list(result["per_layer"])
    fig, axes = plt.subplots(len(metrics), 1, figsize=(12, 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        values = result["per_layer"][metric]
        ax.plot(range(len(values)), list(values.values()), marker=".", linewidth=0.8)
        s = result["summary"][metric]
        ax.set_title(f"cos({metric}) per layer, model order (mean {s.get('mean', float('nan')):.3f})")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
