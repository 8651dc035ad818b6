"""The merge study (``python -m trainer.lab study --config examples/lab/study.toml --out out/study``).

A content adapter (a shape the base never saw, bound to its word) and a style adapter (a
pattern the base never saw) are each trained as QR-LoRA and as LoRA by the project's own
trainer, with the same rank, steps, data and seed; then combined four ways
(``trainer.lab.merges``) and scored with the lab's exact scorers on fixed prompts and noise,
the same for every method. The config is checked completely before anything trains; every
finished adapter is recorded in ``adapters.json``, so an interrupted study resumes without
training any adapter twice. Writes ``study.json``, ``study.md`` and ``study.png`` (see
``trainer.lab.study_report``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from qrlora.checkpoint import write_bytes_atomic
from qrlora.errors import UserError

from . import merges, score, world
from .concept import vocabulary
from .pretrain import BASE_VOCABULARY

SCORERS = ("content", "style", "both", "leakage", "retention")
# each adapter alone (the reference a merge is measured against), then the four merges
METHODS = ("base", "qrlora_content", "qrlora_style", "lora_content", "lora_style",
           "qrlora_sum", "lora_sum", "ziplora", "blora")
ADAPTER_TYPES = ("qrlora", "lora")
ROLE_KINDS = {"content": "shape", "style": "pattern"}  # the role's concept is a new label of this kind
# kohya's attention targets less attn2.to_k, as the striped example had them when the study
# was first run (a float32 basis then refused one text-key projection; it no longer does):
# the text keys stay the base's, so the measured figures stay comparable
DEFAULT_TARGETS = ["unet.*.attn1.to_[qkv]", "unet.*.attn2.to_[qv]", "unet.*.attn[12].to_out.0",
                   "unet.*.ff.net.0.proj", "unet.*.ff.net.2", "unet.*.proj_in", "unet.*.proj_out"]


@dataclass
class Concept:
    role: str  # content or style
    kind: str
    value: str
    steps: int
    learning_rate: float
    images: int


@dataclass
class Study:
    source: str
    base: str
    config_dir: str
    content: Concept
    style: Concept
    rank: int = 4
    alpha: float = 4.0
    batch_size: int = 8
    seed: int = 1
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    threads: int = 1
    methods: list = field(default_factory=lambda: list(METHODS))
    content_weight: float = 1.0
    style_weight: float = 1.0
    ziplora_steps: int = 200
    ziplora_learning_rate: float = 0.05
    ziplora_overlap_weight: float = 0.5
    blora_content_blocks: list = field(default_factory=lambda: ["up_blocks.0.attentions.0"])
    blora_style_blocks: list = field(default_factory=lambda: ["up_blocks.0.attentions.1"])
    samples: int = 96  # per cell
    eval_seeds: list = field(default_factory=lambda: [1000, 2000, 3000])
    eval_steps: int = 20
    sampler: str = "euler_a"
    guidance: float = 1.0
    scorers: list = field(default_factory=lambda: list(SCORERS))


# ----------------------------------------------------------------- the config
_SECTIONS = {
    "base": {"checkpoint": str, "config_dir": str},
    "train": {"rank": int, "alpha": float, "batch_size": int, "seed": int, "targets": list, "threads": int},
    "content": {"kind": str, "value": str, "steps": int, "learning_rate": float, "images": int},
    "style": {"kind": str, "value": str, "steps": int, "learning_rate": float, "images": int},
    "merge": {"methods": list, "content_weight": float, "style_weight": float, "ziplora_steps": int,
              "ziplora_learning_rate": float, "ziplora_overlap_weight": float, "blora_content_blocks": list,
              "blora_style_blocks": list},
    "eval": {"samples": int, "seeds": list, "steps": int, "sampler": str, "guidance": float, "scorers": list},
}


def _check_type(source: str, where: str, value, kind):
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"{source}: {where} = {value!r}: expected {'a list' if kind is list else 'a ' + kind.__name__}")
    return value


def _one_of(source: str, where: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{source}: {where} {value!r}: expected one of {', '.join(allowed)}")


def load_study(path: str) -> Study:
    """Read and check a study TOML; the first problem is one UserError naming its field."""
    from trainer.tomlfile import load_toml

    raw = load_toml(path)
    folder = os.path.dirname(os.path.abspath(path))
    for section, table in raw.items():
        _one_of(path, "section", section, tuple(_SECTIONS))
        if not isinstance(table, dict):
            raise UserError(f"{path}: [{section}] must be a table")
        for key in table:
            _one_of(path, f"[{section}] key", key, tuple(_SECTIONS[section]))
    values = {s: {k: _check_type(path, f"{s}.{k}", v, _SECTIONS[s][k]) for k, v in t.items()} for s, t in raw.items()}
    base = values.get("base", {})
    if "checkpoint" not in base:
        raise UserError(f"{path}: base.checkpoint is missing: expected the lab base .safetensors")
    train = values.get("train", {})
    concepts = {}
    for role in ("content", "style"):
        c = values.get(role)
        if c is None or "value" not in c:
            raise UserError(f"{path}: [{role}] value is missing: expected a new {ROLE_KINDS[role]}")
        kind = c.get("kind", ROLE_KINDS[role])
        _one_of(path, f"{role}.kind", kind, (ROLE_KINDS[role],))
        try:
            vocabulary(kind, c["value"])
        except UserError:
            known = world.PATTERNS if kind == "pattern" else world.SHAPES
            seen = BASE_VOCABULARY.patterns if kind == "pattern" else BASE_VOCABULARY.shapes
            _one_of(path, f"{role}.value", c["value"], tuple(v for v in known if v not in seen))
        concepts[role] = Concept(role, kind, c["value"], c.get("steps", 300), c.get("learning_rate", 3e-3),
                                 c.get("images", 48))
    merge, ev = values.get("merge", {}), values.get("eval", {})
    for where, items, allowed in (("merge.methods", merge.get("methods", []), METHODS),
                                  ("eval.scorers", ev.get("scorers", []), SCORERS)):
        for item in items:
            _one_of(path, where + " entry", item, allowed)
    if "sampler" in ev:
        from trainer.families.sdxl import SAMPLERS

        _one_of(path, "eval.sampler", ev["sampler"], tuple(SAMPLERS))
    study = Study(
        source=os.path.abspath(path),
        base=os.path.join(folder, base["checkpoint"]),
        config_dir=os.path.join(folder, base.get("config_dir", "config")),
        content=concepts["content"], style=concepts["style"],
        **train,
        **{k: v for k, v in merge.items()},
        **{("eval_" + k if k in ("seeds", "steps") else k): v for k, v in ev.items()},
    )
    _check_numbers(path, study)
    return study


def _check_numbers(path: str, s: Study) -> None:
    for where, value, low in (("train.rank", s.rank, 1), ("train.batch_size", s.batch_size, 1),
                              ("content.steps", s.content.steps, 1), ("style.steps", s.style.steps, 1),
                              ("content.images", s.content.images, 1), ("style.images", s.style.images, 1),
                              ("eval.samples", s.samples, 1), ("eval.steps", s.eval_steps, 1)):
        if value < low:
            raise UserError(f"{path}: {where} = {value}: expected at least {low}")
    for where, items, allowed in (("merge.methods", s.methods, METHODS), ("eval.scorers", s.scorers, SCORERS)):
        if not items:
            raise UserError(f"{path}: {where} is empty: expected some of {', '.join(allowed)}")
    if not s.eval_seeds or s.samples % len(s.eval_seeds):
        raise UserError(f"{path}: eval.samples = {s.samples}: expected a multiple of the {len(s.eval_seeds)} eval.seeds")
    if not os.path.isfile(s.base):
        raise UserError(f"{path}: base.checkpoint {s.base}: no such file (python -m trainer.lab pretrain writes it)")
    present = base_blocks(s.base)
    for where, blocks in (("merge.blora_content_blocks", s.blora_content_blocks),
                          ("merge.blora_style_blocks", s.blora_style_blocks)):
        for b in blocks:
            if b not in present:
                raise UserError(f"{path}: {where} entry {b!r}: expected a transformer block of the base's UNet:"
                                f" {', '.join(present)}")


def base_blocks(checkpoint: str) -> list[str]:
    """The UNet transformer blocks of an SDXL-layout file, in model order, from its header."""
    from qrlora import archs
    from qrlora.checkpoint import SafetensorsFile

    targets = archs.get("sdxl").linear_targets(SafetensorsFile(checkpoint).shapes())
    return list(dict.fromkeys(merges.block_of(t.name) for t in targets if t.name.startswith("unet.")))


# ----------------------------------------------------------------- training the adapters
def adapter_names(study: Study) -> list[tuple[str, Concept, str]]:
    return [(f"{c.role}-{t}", c, t) for c in (study.content, study.style) for t in ADAPTER_TYPES]


def training_toml(study: Study, concept: Concept, kind: str, data: str, output_dir: str, name: str) -> str:
    """The trainer config of one adapter: QR-LoRA and LoRA differ only in ``network.type``."""
    q = json.dumps
    return "\n".join([
        "[model]", f"pretrained = {q(study.base)}", f"config_dir = {q(study.config_dir)}", "",
        "[network]", f"type = {q(kind)}", f"rank = {study.rank}", f"alpha = {study.alpha}",
        f"targets = {q(study.targets)}", f"basis_cache = {q(os.path.join(os.path.dirname(output_dir), 'basis-cache'))}", "",
        "[training]", f"output_dir = {q(output_dir)}", f"output_name = {q(name)}", f"seed = {study.seed}",
        f"max_train_steps = {concept.steps}", f"learning_rate = {concept.learning_rate}",
        'lr_scheduler = "constant_with_warmup"', f"lr_warmup_steps = {min(10, concept.steps // 10)}",
        "noise_offset = 0.1", "min_snr_gamma = 5", "cache_text_encoder_outputs = true",
        f"cpu_threads = {study.threads}", "",
        "[saving]", 'save_precision = "fp32"', "save_state = false", "",
        "[general]", "resolution = 32", f"batch_size = {study.batch_size}", "enable_bucket = false",
        'caption_extension = ".txt"', "", "[[datasets]]", "  [[datasets.subsets]]", f"  image_dir = {q(data)}", "",
    ])


def train_adapter(toml_path: str) -> None:
    """One adapter through the project's trainer, in this process."""
    from trainer.config import load_config
    from trainer.loop import run

    rc = run(load_config(toml_path))
    if rc != 0:
        raise UserError(f"{toml_path}: training stopped with exit status {rc}; run the study again to resume")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_all(study: Study, out: str, say=print) -> dict:
    """Train every adapter not yet recorded in ``out/adapters.json`` (recorded: finished with
    this very config and base); returns the record."""
    from .concept import write_dataset

    record_path = os.path.join(out, "adapters.json")
    record = {}
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    base_digest = _sha256(study.base)
    for name, concept, kind in adapter_names(study):
        data = os.path.join(out, "data", f"{concept.value}-{concept.images}")
        output_dir = os.path.join(out, "adapters", name)
        text = training_toml(study, concept, kind, data, output_dir, name)
        digest = hashlib.sha256((text + base_digest).encode()).hexdigest()
        file = os.path.join(output_dir, name + ".safetensors")
        done = record.get(name)
        if done and done["digest"] == digest and os.path.isfile(os.path.join(out, done["file"])):
            say(f"{name}: already trained ({done['seconds']} s), kept")
            continue
        if not os.path.isfile(os.path.join(data, f"{concept.value}-{concept.images - 1:03d}.png")):
            write_dataset(data, concept.kind, concept.value, concept.images, 1, seed=0)
        toml_path = os.path.join(out, "adapters", name + ".toml")
        os.makedirs(os.path.dirname(toml_path), exist_ok=True)
        write_bytes_atomic(toml_path, text.encode("utf-8"))
        say(f"{name}: training {kind} on {concept.kind} {concept.value!r}, {concept.steps} steps")
        started = time.time()
        train_adapter(toml_path)
        record[name] = {"file": os.path.relpath(file, out), "digest": digest,
                        "seconds": round(time.time() - started, 1)}
        write_bytes_atomic(record_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return {name: dict(r, file=os.path.join(out, r["file"])) for name, r in record.items()}


# ----------------------------------------------------------------- evaluation
def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of k successes in n trials."""
    if n <= 0:
        raise ValueError("wilson: no trials")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact at the ends: centre - half is 0 when k = 0 only up to rounding (3e-18 at n = 96)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def prompt_sets(study: Study) -> dict[str, list[tuple[world.Scene, int]]]:
    """(scene, noise seed) per prompt set, fixed by the eval seeds and the same for every method:
    content (the new shape's word), style (the new pattern's word), both words at once, and
    base (base-world captions, neither word) for leakage and retention."""
    shape, pattern = study.content.value, study.style.value
    b = BASE_VOCABULARY
    combos = {
        "content": vocabulary("shape", shape).combinations(),
        "style": vocabulary("pattern", pattern).combinations(),
        "both": [(c, shape, pattern, bg) for c in b.colours for bg in b.backgrounds],
        "base": b.combinations(),
    }
    per_seed = study.samples // len(study.eval_seeds)
    out = {}
    for i, (name, cs) in enumerate(combos.items()):
        items = []
        for seed in study.eval_seeds:
            scenes = world.sample_scenes(per_seed, seed=seed * 10 + i, combos=cs)
            items += [(s, seed * 100_000 + i * 10_000 + j) for j, s in enumerate(scenes)]
        out[name] = items
    return out


def judge(study: Study, prompt_set: str, scene: world.Scene, r: score.Reading) -> dict[str, bool]:
    """Which scorers a sample passes (each scorer reads one prompt set)."""
    shape, pattern = study.content.value, study.style.value
    if prompt_set == "content":
        return {"content": r.shape == shape}
    if prompt_set == "style":
        return {"style": r.pattern == pattern}
    if prompt_set == "both":
        return {"both": r.shape == shape and r.pattern == pattern}
    return {"leakage": r.shape == shape or r.pattern == pattern,
            "retention": (r.colour, r.shape, r.background) == (scene.colour, scene.shape, scene.background)}


@contextmanager
def applied(modules: dict, delta: dict):
    """The model with ΔW added to its layers' weights, restored exactly afterwards."""
    saved = {}
    try:
        with torch.no_grad():
            for name, dw in delta.items():
                weight = modules[name].weight
                saved[name] = weight.detach().clone()
                weight.add_(dw.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)


def evaluate(study: Study, family, models, modules: dict, delta: dict, sets: dict) -> dict:
    """Sample every prompt set with ``delta`` applied; counts, fractions and intervals per scorer."""
    from .sample import sample_batch

    order = [(name, scene, seed) for name, items in sets.items() for scene, seed in items]
    with applied(modules, delta):
        images = sample_batch(family, models, [world.caption(s) for _, s, _ in order], [d for _, _, d in order],
                              steps=study.eval_steps, guidance_scale=study.guidance, sampler=study.sampler)
    shapes = BASE_VOCABULARY.shapes + (study.content.value,)
    patterns = BASE_VOCABULARY.patterns + (study.style.value,)
    hits: dict[str, list[bool]] = {}
    by_seed: dict[str, dict[int, list[bool]]] = {}
    for (name, scene, seed), image in zip(order, images):
        reading = score.read(image, shapes=shapes, patterns=patterns)
        for scorer, ok in judge(study, name, scene, reading).items():
            hits.setdefault(scorer, []).append(ok)
            by_seed.setdefault(scorer, {}).setdefault(seed // 100_000, []).append(ok)
    out = {}
    for scorer in study.scorers:
        k, n = sum(hits[scorer]), len(hits[scorer])
        lo, hi = wilson(k, n)
        out[scorer] = {"k": k, "n": n, "fraction": k / n, "low": lo, "high": hi,
                       "per_seed": {str(s): sum(v) / len(v) for s, v in by_seed[scorer].items()}}
    return out, images


def combine(study: Study, record: dict) -> tuple[dict, dict]:
    """Every method's ΔW ({} for the base) and what the merges report (ZipLoRA's objective)."""
    files = {name: r["file"] for name, r in record.items()}
    qr_c, q = merges.qr_file(files["content-qrlora"])
    qr_s, _ = merges.qr_file(files["style-qrlora"])
    lora_c = merges.lora_delta_weights(files["content-lora"], qr_c.targets)
    lora_s = merges.lora_delta_weights(files["style-lora"], qr_s.targets)
    weights = (study.content_weight, study.style_weight)
    deltas, notes = {}, {}
    for method in study.methods:
        started = time.time()
        if method == "base":
            deltas[method] = {}
        elif method in ("qrlora_content", "qrlora_style", "lora_content", "lora_style"):
            adapter_type, role = method.split("_")
            weight = weights[0] if role == "content" else weights[1]
            if adapter_type == "qrlora":  # through the same fusion as the sum, of one file
                deltas[method] = merges.qrlora_sum([(role, qr_c if role == "content" else qr_s, weight)], q)
            else:
                deltas[method] = merges.lora_sum([(lora_c if role == "content" else lora_s, weight)])
        elif method == "qrlora_sum":
            deltas[method] = merges.qrlora_sum([("content", qr_c, weights[0]), ("style", qr_s, weights[1])], q)
        elif method == "lora_sum":
            deltas[method] = merges.lora_sum([(lora_c, weights[0]), (lora_s, weights[1])])
        elif method == "ziplora":
            deltas[method], per_layer = merges.zip_merge(
                lora_c, lora_s, study.ziplora_steps, study.ziplora_learning_rate, study.ziplora_overlap_weight, weights)
            notes["ziplora"] = merges.summarise_zip(per_layer)
        elif method == "blora":
            deltas[method] = merges.block_split(lora_c, lora_s, study.blora_content_blocks,
                                                study.blora_style_blocks, weights)
        notes.setdefault(method, {})["merge_seconds"] = round(time.time() - started, 2)
    notes["targets"] = qr_c.targets
    qr_dw_c, qr_dw_s = merges.qr_delta_weights(qr_c, q), merges.qr_delta_weights(qr_s, q)
    notes["block_energy"] = {"content-qrlora": merges.block_energy(qr_dw_c), "style-qrlora": merges.block_energy(qr_dw_s),
                             "content-lora": merges.block_energy(lora_c), "style-lora": merges.block_energy(lora_s)}
    return deltas, notes


def similarity(record: dict, targets: dict) -> dict:
    """The paper's analysis: per-layer cos(ΔR) of the QR-LoRA content and style adapters
    against the LoRAs' cos of A (down), B (up) and ΔW, through ``qrlora similarity``, in
    model order (``targets``: a ΔR file's, whose kohya module names key the LoRA files)."""
    from qrlora import archs
    from qrlora.similarity import compare

    qr = compare(record["content-qrlora"]["file"], record["style-qrlora"]["file"])
    lora = compare(record["content-lora"]["file"], record["style-lora"]["file"])
    module = {name: archs.get("sdxl").kohya_module(t)[0] for name, t in targets.items()}
    layers = [n for n in targets if n in qr["per_layer"]["delta_r"]]
    per_layer = {"qrlora_delta_r": [qr["per_layer"]["delta_r"][n] for n in layers]}
    for metric, label in (("down", "lora_A"), ("up", "lora_B"), ("delta_w", "lora_delta_w")):
        per_layer[label] = [lora["per_layer"][metric][module[n]] for n in layers]
    summary = {k: {"mean": sum(v) / len(v), "mean_abs": sum(abs(x) for x in v) / len(v)} for k, v in per_layer.items()}
    return {"layers": layers, "per_layer": per_layer, "summary": summary}


def run_study(config_path: str, out: str, say=print) -> dict:
    """The whole study; returns what ``study.json`` holds."""
    from trainer.families import get_family

    from .pretrain import load, save_grid
    from .study_report import write_outputs

    study = load_study(config_path)
    out = os.path.abspath(out)  # the adapters' configs name their folders, and paths in a config are relative to it
    started, load_before = time.time(), os.getloadavg()
    os.makedirs(out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(study.threads)
    try:
        record = train_all(study, out, say)
        train_seconds = round(time.time() - started, 1)
        deltas, notes = combine(study, record)
        family = get_family("sdxl")
        models = load(study.base, study.config_dir)
        models.denoiser.eval()
        modules = family.trainable_modules(models, include_text_encoders=False)
        sets = prompt_sets(study)
        results = {}
        for method, delta in deltas.items():
            t = time.time()
            results[method], images = evaluate(study, family, models, modules, delta, sets)
            save_grid(images[:: max(1, len(images) // 64)][:64], os.path.join(out, f"samples-{method}.png"))
            say(f"{method}: " + ", ".join(f"{k} {v['fraction']:.1%}" for k, v in results[method].items())
                + f" ({time.time() - t:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    report = {
        "config": {k: v for k, v in asdict(study).items()},
        "results": results, "merges": notes, "similarity": similarity(record, notes.pop("targets")),
        "adapters": {k: {"seconds": v["seconds"], "file": os.path.relpath(v["file"], out)} for k, v in record.items()},
        "seconds": {"training_this_run": train_seconds, "total": round(time.time() - started, 1)},
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    write_outputs(report, out)
    return report
