"""The merge study's outputs: ``study.json`` (everything), ``study.md`` (the tables) and
``study.png`` (a bar chart with 95 % intervals, and the per-layer cosines)."""

from __future__ import annotations

import json
import os

from qrlora.checkpoint import atomic_output, write_bytes_atomic

METHOD_TITLES = {
    "base": "base (no adapter)",
    "qrlora_content": "QR-LoRA content alone",
    "qrlora_style": "QR-LoRA style alone",
    "lora_content": "LoRA content alone",
    "lora_style": "LoRA style alone",
    "qrlora_sum": "QR-LoRA Σλ·ΔR",
    "lora_sum": "LoRA sum",
    "ziplora": "ZipLoRA merge",
    "blora": "B-LoRA block split",
}
SCORER_TITLES = {
    "content": "content present ↑",
    "style": "style present ↑",
    "both": "both at once ↑",
    "leakage": "leakage ↓",
    "retention": "base skills kept ↑",
}
# the lower panel's lines, styled apart from the bars above (whose colours mean methods)
SIMILARITY_STYLES = {
    "qrlora_delta_r": {"color": "black", "linestyle": "-"},
    "lora_A": {"color": "tab:gray", "linestyle": ":"},
    "lora_B": {"color": "tab:brown", "linestyle": "--"},
    "lora_delta_w": {"color": "tab:olive", "linestyle": "-."},
}
SIMILARITY_TITLES = {
    "qrlora_delta_r": "QR-LoRA cos(ΔR)",
    "lora_A": "LoRA cos(A)",
    "lora_B": "LoRA cos(B)",
    "lora_delta_w": "LoRA cos(ΔW)",
}


def cell(r: dict) -> str:
    return f"{100 * r['fraction']:.1f} % [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def markdown(report: dict) -> str:
    results = report["results"]
    scorers = list(next(iter(results.values())))
    lines = ["| method | " + " | ".join(SCORER_TITLES[s] for s in scorers) + " |",
             "|---|" + "---|" * len(scorers)]
    for method, row in results.items():
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cell(row[s]) for s in scorers) + " |")
    n = next(iter(next(iter(results.values())).values()))["n"]
    lines += ["", f"{n} samples per cell; 95 % Wilson intervals in brackets.", "",
              "| content vs style adapter, per layer | mean cos | mean abs cos |", "|---|---|---|"]
    for key, s in report["similarity"]["summary"].items():
        lines.append(f"| {SIMILARITY_TITLES[key]} | {s['mean']:.3f} | {s['mean_abs']:.3f} |")
    energy = report["merges"]["block_energy"]
    blocks = list(next(iter(energy.values())))
    lines += ["", "| share of Σ‖ΔW‖² | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
    for adapter, shares in energy.items():
        lines.append(f"| {adapter} | " + " | ".join(f"{100 * shares.get(b, 0):.0f} %" for b in blocks) + " |")
    z = report["merges"].get("ziplora", {})
    if "objective" in z:
        lines += ["", (f"ZipLoRA merge, mean over {z['layers']} layers (before → after): objective "
                       f"{z['objective'][0]:.3f} → {z['objective'][1]:.3f}, preservation error "
                       f"{z['preservation'][0]:.3f} → {z['preservation'][1]:.3f}, coefficient overlap (cos) "
                       f"{z['overlap'][0]:.3f} → {z['overlap'][1]:.3f}.")]
    return "\n".join(lines) + "\n"


def figure(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    methods = list(results)
    scorers = list(results[methods[0]])
    fig, (bars, lines) = plt.subplots(2, 1, figsize=(12, 9))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(scorers))]
        ys = [100 * results[method][s]["fraction"] for s in scorers]
        err = [[max(0.0, y - 100 * results[method][s]["low"]) for y, s in zip(ys, scorers)],
               [max(0.0, 100 * results[method][s]["high"] - y) for y, s in zip(ys, scorers)]]
        bars.bar(xs, ys, width, yerr=err, capsize=2, label=METHOD_TITLES[method])
    bars.set_xticks(range(len(scorers)), [SCORER_TITLES[s] for s in scorers])
    bars.set_ylabel("% of samples")
    bars.set_ylim(0, 105)
    n = results[methods[0]][scorers[0]]["n"]
    bars.set_title(f"Merging a content and a style adapter on the lab base ({n} samples per bar, 95 % Wilson intervals)")
    bars.legend(fontsize=8, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    sim = report["similarity"]
    for key, values in sim["per_layer"].items():
        lines.plot(range(len(values)), values, marker=".", linewidth=0.9, **SIMILARITY_STYLES[key],
                   label=f"{SIMILARITY_TITLES[key]} (mean |cos| {sim['summary'][key]['mean_abs']:.2f})")
    lines.axhline(0, color="grey", linewidth=0.5)
    lines.set_ylim(-1.05, 1.05)
    lines.set_xlabel("adapted layer, model order")
    lines.set_ylabel("cosine, content vs style")
    lines.set_title("Per-layer similarity of the content and the style adapter")
    lines.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_outputs(report: dict, out: str) -> None:
    write_bytes_atomic(os.path.join(out, "study.json"), (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    write_bytes_atomic(os.path.join(out, "study.md"), markdown(report).encode("utf-8"))
    figure(report, os.path.join(out, "study.png"))
