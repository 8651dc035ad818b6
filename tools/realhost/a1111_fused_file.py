"""Read a fused ΔR file back and compare it with the sum it should hold; prints one JSON line.

    python tools/realhost/a1111_fused_file.py FUSED INPUT:λ [INPUT:λ ...]

Run with a Python that has this project installed (the real-A1111 check's ``--qrlora-python``).
The expected sum is computed here from the inputs' own tensors, per layer
Σ λᵢ·sᵢ·ΔRᵢ, and compared with s·ΔR of the fused file (which is stored in fp16), so a file the
tools tab wrote is judged by what it contains, not by running the same fusion code again.
"""

from __future__ import annotations

import json
import sys

from qrlora import deltar


def raw_metadata(path: str) -> dict:
    """The file's header metadata as written (``deltar.load`` keeps the ``qrlora.*`` keys out of
    ``DeltaR.metadata``, which holds only the others)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def compare(fused_path: str, inputs: list[tuple[str, float]]) -> dict:
    fused = deltar.load(fused_path)
    loaded = [(deltar.load(path), weight) for path, weight in inputs]
    worst, names = 0.0, set()
    for d, _ in loaded:
        names.update(d.layers)
    for name in names:
        expected = sum(weight * d.scale * d.layers[name].float() for d, weight in loaded if name in d.layers)
        got = fused.scale * fused.layers[name].float() if name in fused.layers else 0 * expected
        worst = max(worst, float((got - expected).norm() / expected.norm().clamp_min(1e-30)))
    return {"layers": len(fused.layers), "expected_layers": len(names), "basis_id": fused.basis_id,
            "same_basis": all(d.basis_id == fused.basis_id for d, _ in loaded), "max_relative_error": worst,
            "fused_from": raw_metadata(fused_path).get("qrlora.fused_from", "")}


def main(argv: list[str]) -> None:
    fused, *specs = argv
    inputs = []
    for spec in specs:
        path, _, weight = spec.rpartition(":")
        inputs.append((path, float(weight)))
    print(json.dumps(compare(fused, inputs)))


if __name__ == "__main__":
    main(sys.argv[1:])
