"""Per-layer cosine similarity between two adapters (the paper's disentanglement figure).

For ΔR files: cos of the flattened ΔR, which equals cos(ΔW₁, ΔW₂) because Q is orthonormal
and shared. For standard LoRAs: cos of the down (A) and up (B) matrices and of ΔW = B·A,
the latter from ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ) without forming ΔW.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import torch

from .checkpoint import FileFormatError, SafetensorsFile
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


def _read(path: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(kind, {layer: {part: tensor}}) for a ΔR, official or standard LoRA file."""
    f = SafetensorsFile(path)
    kind = f.metadata.get("qrlora.kind")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    if kind == "delta_r":
        for key in f.keys:
            if key.endswith(".delta_r"):
                layers[key[: -len(".delta_r")]] = {"delta_r": f.tensor(key)}
        return "delta_r", layers
    if kind:
        raise FileFormatError(f"{path}: a QR-LoRA {kind} file has no adapter weights to compare")
    if any(k.endswith(SUFFIX_DR) for k in f.keys):
        for key in f.keys:
            for part, suffix in (("q", SUFFIX_Q), ("delta_r", SUFFIX_DR), ("base_r", SUFFIX_BASE)):
                if key.endswith(suffix):
                    layers.setdefault(key[: -len(suffix)], {})[part] = f.tensor(key)
        return "official", layers
    for down_suffix, up_suffix in LORA_PAIRS:
        for key in f.keys:
            if key.endswith(down_suffix):
                name = key[: -len(down_suffix)]
                if name + up_suffix in f.header:
                    layers[name] = {"down": f.tensor(key), "up": f.tensor(name + up_suffix)}
        if layers:
            return "lora", layers
    raise FileFormatError(f"{path}: neither a ΔR file, an official QR-LoRA file nor a LoRA (lora_down/lora_up or lora_A/lora_B)")


def compare(path_a: str, path_b: str) -> dict:
    kind_a, a = _read(path_a)
    kind_b, b = _read(path_b)
    if kind_a != kind_b:
        raise FileFormatError(f"cannot compare a {kind_a} file ({path_a}) with a {kind_b} file ({path_b})")
    common = [n for n in a if n in b]
    if not common:
        raise FileFormatError(f"{path_a} and {path_b} share no layer")
    per_metric: dict[str, dict[str, float]] = {}
    for name in common:
        la, lb = a[name], b[name]
        if kind_a == "lora":
            if la["down"].shape != lb["down"].shape or la["up"].shape != lb["up"].shape:
                per_metric.setdefault("delta_w", {})[name] = _delta_w_cos(la["down"], la["up"], lb["down"], lb["up"])
                continue
            per_metric.setdefault("down", {})[name] = _cos(la["down"], lb["down"])
            per_metric.setdefault("up", {})[name] = _cos(la["up"], lb["up"])
            per_metric.setdefault("delta_w", {})[name] = _delta_w_cos(la["down"], la["up"], lb["down"], lb["up"])
        else:
            for part in la:
                if part in lb and la[part].shape == lb[part].shape:
                    per_metric.setdefault(part, {})[name] = _cos(la[part], lb[part])
    return {
        "kind": kind_a,
        "files": [path_a, path_b],
        "layers": common,
        "only_in_a": [n for n in a if n not in b],
        "only_in_b": [n for n in b if n not in a],
        "summary": {m: _stats(v) for m, v in per_metric.items()},
        "per_layer": per_metric,
    }


def _stats(values: Mapping[str, float]) -> dict[str, float]:
    xs = [v for v in values.values() if not math.isnan(v)]
    if not xs:
        return {"count": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return {"count": len(xs), "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


def format_summary(result: dict) -> str:
    lines = [f"{result['kind']} files, {len(result['layers'])} common layers"]
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
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
