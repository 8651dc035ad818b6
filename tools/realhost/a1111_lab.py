"""The README demo's ΔR in the real Automatic1111 on the lab base, scored by the lab's scorer.

    . .venv/bin/activate      # this project (torch, the lab scorer, the qrlora core)
    python -m trainer --config examples/demo.toml      # if out/demo/ has no demo_striped yet
    nice -n 19 python tools/realhost/a1111_lab.py --webui /tmp/realhost/a1111 --work /tmp/realhost/work

Needs what ``a1111_setup.py`` prepared (the WebUI's venv and repositories, the extension link).
What it does:

1. Installs the lab base into the WebUI: ``models/Stable-diffusion/lab-base.safetensors`` and
   ``lab-base.yaml`` beside it, the sgm ``DiffusionEngine`` config read off
   ``examples/lab/config`` (``a1111_setup.sgm_config`` with the lab's encoders, and sgm's
   ``VScaling``/``VWeighting`` denoiser when the scheduler config says ``v_prediction``); TE1's
   tokenizer folder ``WORK/clip-lab`` and TE2's open_clip config ``lab-base-te2``; the ΔR as
   ``models/QRLoRA/demo_striped.safetensors`` and the demo's basis file, when there is one,
   as ``models/QRLoRA-basis/<basis id>.safetensors`` (the name the extension looks up).
2. Starts the WebUI (API, CPU, offline; ``a1111_check.WebUI``) on the lab base with the
   environment the patched copy reads: sgm's GroupNorm groups (UNet 8, VAE 1, from the configs)
   and A1111's latent factor (2, the lab VAE's, instead of SDXL's 8; without it a 32 x 32
   request samples a 4 x 4 latent and returns an 8 x 8 image).
3. Generates the demo's 16 prompts (``examples/lab/striped-prompts.txt``: caption, seed; 32 x 32,
   Euler a, 20 steps, CFG 1) untagged, with ``<qrlora:demo_striped:1>``, with
   ``<qrlora:demo_striped:0.5>``, untagged again (must be bit-identical to the first untagged
   images: the tag is removed), and untagged and tagged with the "DDIM" schedule type, which
   gives the trainer's sampler's timesteps (diffusers' "leading" spacing: 951, 901, ... 1)
   instead of A1111's default (999 ... 0 evenly), to tell the schedule's share of any
   difference from the trainer's scores.
4. Starts the WebUI again without the latent-factor variable (A1111's factor 8, what a WebUI
   copy without that edit does) and generates untagged and tagged asking for 128 x 128, which
   gives the lab's 32 x 32 images with 128 in SDXL's size conditioning (the trainer's is 32).
5. Scores every image with ``trainer.lab.score.read`` (the base world's shapes and patterns plus
   ``striped``), and the trainer's own samples of the same prompts (``out/demo/sample``,
   before training and at the last step), prints a table (striped, colour kept, shape kept,
   background kept) and the pixel differences to the trainer's samples. Writes
   ``WORK/run-lab/`` (``results.json``, ``results.md``, the images, ``webui.log``,
   ``webui-factor8.log``) and the grid ``docs/img/a1111-lab-demo.png`` (untagged row, tagged row).

Exit status 0 when the tag gives stripes in at least ``--min-striped`` of the images (default
0.75, 12 of 16: the trainer's sampler gives 15 of 16 with the committed demo.toml, and A1111's
default schedule is not the trainer's, so a margin of 3 images), no untagged image shows
stripes, the tag is removed bit-exactly, and the DDIM schedule type reproduces the trainer's
samples within 2 of 255 per pixel.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import time

# a1111_*: this folder is on sys.path (the file runs as a script)
import a1111_setup as setup
import torch
from a1111_check import KNOWN_CONSOLE_ERRORS, WebUI
from a1111_page import pixel_difference, shrink_png
from PIL import Image

from trainer.lab import concept, score  # a1111_setup puts the project on sys.path
from trainer.lab.pretrain import BASE_VOCABULARY
from trainer.prompts import load_prompts

PROJECT = setup.PROJECT
LAB = os.path.join(PROJECT, "examples", "lab")
NAME = "lab-base"
DELTA = "demo_striped"
CONCEPT = ("pattern", "striped")
# the sgm discretization A1111 samples with whatever the yaml says (modules/sd_models_xl.py)
A1111_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SETTINGS = {"live_previews_enable": False, "show_progress_every_n_steps": -1}


# ------------------------------------------------------------------ 1. the lab base in the WebUI
def lab_sgm_config(configs: str, clip_folder: str) -> dict:
    """``a1111_setup.sgm_config`` for the lab base: its encoders' names, and the denoiser its
    scheduler config asks for (v-prediction: sgm's VScaling/VWeighting)."""
    scheduler = setup.load_json(os.path.join(configs, "scheduler", "scheduler_config.json"))
    if scheduler.get("beta_schedule") != "scaled_linear":
        # sgm's "linear" discretization spaces the square roots of the betas: diffusers' scaled_linear
        raise SystemExit(f"{configs}/scheduler: beta_schedule {scheduler.get('beta_schedule')!r}; "
                         "sgm's LegacyDDPMDiscretization gives only 'scaled_linear'")
    differs = {k: (scheduler.get(k), v) for k, v in A1111_BETAS.items() if scheduler.get(k) != v}
    if differs:
        raise SystemExit(f"{configs}/scheduler: {differs} (file, A1111): A1111 samples SDXL models with "
                         "the default schedule whatever the yaml says, so this model would be sampled wrongly")
    kinds = {"v_prediction": "V", "epsilon": "Eps"}
    kind = kinds.get(scheduler.get("prediction_type", "epsilon"))
    if kind is None:
        raise SystemExit(f"{configs}/scheduler: prediction_type {scheduler['prediction_type']!r}; "
                         f"expected one of {', '.join(kinds)}")
    config = setup.sgm_config(configs, clip_folder, te2_arch=NAME + "-te2")
    denoiser = config["model"]["params"]["denoiser_config"]["params"]
    prefix = "sgm.modules.diffusionmodules."
    denoiser["weighting_config"] = {"target": f"{prefix}denoiser_weighting.{kind}Weighting"}
    denoiser["scaling_config"] = {"target": f"{prefix}denoiser_scaling.{kind}Scaling"}
    denoiser["num_idx"] = scheduler["num_train_timesteps"]
    denoiser["discretization_config"]["params"] = {
        "linear_start": scheduler["beta_start"], "linear_end": scheduler["beta_end"],
        "num_timesteps": scheduler["num_train_timesteps"]}
    return config


def environment(configs: str) -> dict[str, str]:
    """What the patched WebUI copy reads (a1111_setup): GroupNorm groups and the latent factor."""
    unet = setup.load_json(os.path.join(configs, "unet", "config.json"))
    vae = setup.load_json(os.path.join(configs, "vae", "config.json"))
    return {setup.UNET_GROUPS_VAR: str(unet["norm_num_groups"]), setup.VAE_GROUPS_VAR: str(vae["norm_num_groups"]),
            setup.LATENT_FACTOR_VAR: str(2 ** (len(vae["block_out_channels"]) - 1))}


def install(webui: str, work: str, demo_dir: str) -> dict:
    """Copy the base, its yaml, the tokenizer folder, TE2's config, the ΔR and its basis into the
    WebUI; patch the WebUI copy (idempotent). Returns what was installed, for the record."""
    configs = os.path.join(LAB, "config")
    base = os.path.join(LAB, NAME + ".safetensors")
    delta = os.path.join(demo_dir, DELTA + ".safetensors")
    for path, how in ((base, "the lab base"), (delta, "python -m trainer --config examples/demo.toml")):
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing ({how})")
    if os.path.getmtime(delta) < os.path.getmtime(base):
        raise SystemExit(f"{delta} is older than {base}: train it again "
                         "(python -m trainer --config examples/demo.toml)")
    setup.patch_sgm_groupnorm(webui)
    setup.patch_latent_factor(webui)
    setup.link_extension(webui)
    models = os.path.join(webui, "models")
    shutil.copyfile(base, os.path.join(models, "Stable-diffusion", NAME + ".safetensors"))
    clip_folder = setup.prepare_clip_tokenizer(work, configs, "clip-lab", base)
    with open(os.path.join(models, "Stable-diffusion", NAME + ".yaml"), "w", encoding="utf-8") as f:
        json.dump(lab_sgm_config(configs, clip_folder), f, indent=1)
    py = setup.venv_python(work)
    te2 = os.path.join(setup.site_packages(py), "open_clip", "model_configs", NAME + "-te2.json")
    with open(te2, "w", encoding="utf-8") as f:
        json.dump(setup.open_clip_config(configs), f, indent=1)
    copies = [os.path.join(models, "QRLoRA", DELTA + ".safetensors")]
    shutil.copyfile(delta, copies[0])
    basis_id = deltar_basis_id(delta)
    basis = os.path.join(demo_dir, f"basis-{basis_id}.safetensors")
    basis_dir = os.path.join(models, "QRLoRA-basis")
    shutil.rmtree(basis_dir, ignore_errors=True)  # only this basis: what the extension uses is known
    if os.path.isfile(basis):
        os.makedirs(basis_dir)
        # the extension looks a basis up as <basis id>.safetensors; the trainer names it basis-<id>
        copies.append(os.path.join(basis_dir, basis_id + ".safetensors"))
        shutil.copyfile(basis, copies[1])
    print(f"[lab] installed {NAME} (+ .yaml, {clip_folder}, {te2}), {DELTA} (basis {basis_id}: "
          f"{'copied' if os.path.isfile(basis) else 'none in ' + demo_dir + ', computed on first use'})", flush=True)
    return {"basis_id": basis_id, "basis_copied": os.path.isfile(basis), "env": environment(configs), "copies": copies}


def deltar_basis_id(path: str) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()["qrlora.basis_id"]


# ------------------------------------------------------------------ 2.-4. the WebUI and the generations
class LabWebUI(WebUI):
    checkpoint = NAME + ".safetensors"

    def __init__(self, webui: str, work: str, port: int, env: dict[str, str]):
        super().__init__(webui, work, port)
        self.run_dir = os.path.join(work, "run-lab")
        self.extra_env = env

    def fresh_settings(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(SETTINGS, f)

    def generate(self, prompt, text: str, schedule: str, size_scale: int = 1) -> tuple[Image.Image, str, float]:
        """One image of a trainer ``SamplePrompt`` (seed, steps, size times ``size_scale``, CFG)."""
        started = time.perf_counter()
        r = self.post("/sdapi/v1/txt2img", {
            "prompt": text, "negative_prompt": "", "seed": prompt.seed, "steps": prompt.steps,
            "width": prompt.width * size_scale, "height": prompt.height * size_scale, "cfg_scale": prompt.scale,
            "sampler_name": "Euler a", "scheduler": schedule, "batch_size": 1, "n_iter": 1})
        image = Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")
        return image, json.loads(r["info"])["infotexts"][0], time.perf_counter() - started


TAG_1, TAG_HALF = f" <qrlora:{DELTA}:1>", f" <qrlora:{DELTA}:0.5>"
# label -> (tag appended to the caption, A1111 schedule type)
WAYS = {
    "untagged": ("", "Automatic"),
    "tag 1": (TAG_1, "Automatic"),
    "tag 0.5": (TAG_HALF, "Automatic"),
    "untagged again": ("", "Automatic"),
    "untagged, DDIM schedule": ("", "DDIM"),
    "tag 1, DDIM schedule": (TAG_1, "DDIM"),
}
# Without the latent-factor edit A1111 assumes SDXL's factor 8: asking for 128 x 128 then gives
# the lab's 32 x 32 images, with 128 in SDXL's size conditioning (the trainer's is 32).
FACTOR_8 = ", factor 8, 128x128 asked"
WAYS_FACTOR_8 = {"untagged" + FACTOR_8: ("", "Automatic"), "tag 1" + FACTOR_8: (TAG_1, "Automatic")}


def session(webui: LabWebUI, prompts, ways: dict, log_name: str, size_scale: int = 1) -> dict:
    """Start the WebUI, generate every prompt each way (saved in the run folder), stop it."""
    out = {"images": {}, "seconds": {}, "infotexts": {}}
    try:
        out["start_seconds"] = webui.start(log_name)
        for label, (tag, schedule) in ways.items():
            started = time.perf_counter()
            images = out["images"][label] = []
            for p in prompts:
                image, info, _ = webui.generate(p, p.prompt + tag, schedule, size_scale)
                images.append(image)
                out["infotexts"].setdefault(label, info)
                image.save(os.path.join(webui.run_dir, f"{label.replace(' ', '_').replace(',', '')}-{p.index:02d}.png"))
            out["seconds"][label] = time.perf_counter() - started
            print(f"[lab] {label}: {len(prompts)} images in {out['seconds'][label]:.1f} s", flush=True)
    finally:
        webui.stop()
    out["console"] = webui.console()
    return out


# ------------------------------------------------------------------ 5. scores
def judge(image: Image.Image, caption: str) -> dict[str, bool]:
    """The lab scorer's reading of one image against its caption: striped, colour, shape and
    background kept (candidates: the base world's shapes and patterns, and ``striped``)."""
    vocab = concept.vocabulary(*CONCEPT)
    shapes = tuple(dict.fromkeys(BASE_VOCABULARY.shapes + vocab.shapes))
    patterns = tuple(dict.fromkeys(BASE_VOCABULARY.patterns + vocab.patterns))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    reading = score.read(pixels.view(image.height, image.width, 3).permute(2, 0, 1), shapes=shapes, patterns=patterns)
    colour, shape, _, background = concept.labels_of(caption)
    return {"striped": reading.pattern == CONCEPT[1], "colour": reading.colour == colour,
            "shape": reading.shape == shape, "background": reading.background == background}


def counts(images: list[Image.Image], prompts) -> dict[str, int]:
    """How many of the images show stripes, and keep their caption's colour, shape, background."""
    judged = [judge(image, p.prompt) for image, p in zip(images, prompts)]
    return {key: sum(j[key] for j in judged) for key in ("striped", "colour", "shape", "background")}


def trainer_samples(demo_dir: str, prompts) -> dict[str, list[Image.Image]]:
    """The trainer's samples of the same prompts: before training and at the last step."""
    by_tag = concept.sample_files(os.path.join(demo_dir, "sample"), DELTA)
    last = max((t for t in by_tag if t != "first"), default=None)
    labels = {"first": "trainer, before training"}
    if last:
        labels[last] = f"trainer, step {int(last)}"
    return {label: [Image.open(by_tag[tag][p.index]).convert("RGB") for p in prompts]
            for tag, label in labels.items() if all(p.index in by_tag.get(tag, {}) for p in prompts)}


def grid(rows: list[list[Image.Image]], path: str, scale: int = 4, gap: int = 2) -> str:
    """Rows of images side by side, scaled up (nearest), under 100 KB."""
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    sheet = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.resize((w, h), Image.NEAREST), (c * (w + gap), r * (h + gap)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path, optimize=True)
    return f"{path} ({shrink_png(path) // 1000} KB)"


def table(scores: dict[str, dict[str, int]], n: int) -> list[str]:
    lines = ["| images | striped | colour kept | shape kept | background kept |", "|---|---|---|---|---|"]
    for label, s in scores.items():
        lines.append(f"| {label} | " + " | ".join(f"{s[k]}/{n}" for k in ("striped", "colour", "shape", "background"))
                     + " |")
    return lines


# ------------------------------------------------------------------ main
def compare(a: list[Image.Image], b: list[Image.Image]) -> dict:
    """Per-image max pixel difference, and the mean difference over all images (0-255)."""
    diffs = [pixel_difference(x, y) for x, y in zip(a, b)]
    return {"max": [d[0] for d in diffs], "mean": round(sum(d[1] for d in diffs) / len(diffs), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, help="the A1111 checkout a1111_setup.py prepared")
    parser.add_argument("--work", required=True, help="the setup's work folder")
    parser.add_argument("--demo", default=os.path.join(PROJECT, "out", "demo"), help="the demo's output folder")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--min-striped", type=float, default=0.75,
                        help="the least fraction of tagged images that must show stripes")
    parser.add_argument("--grid", default=os.path.join(PROJECT, "docs", "img", "a1111-lab-demo.png"))
    args = parser.parse_args(argv)
    webui_dir, work = os.path.abspath(args.webui), os.path.abspath(args.work)
    prompts = load_prompts(os.path.join(LAB, "striped-prompts.txt"))
    n = len(prompts)
    load_start, started = os.getloadavg(), time.perf_counter()
    installed = install(webui_dir, work, args.demo)
    env = installed["env"]
    webui = LabWebUI(webui_dir, work, args.port, env)
    webui.fresh_settings()
    try:
        runs = [session(webui, prompts, WAYS, "webui.log")]
        factor = int(env[setup.LATENT_FACTOR_VAR])
        if factor != 8:
            webui.extra_env = {**env, setup.LATENT_FACTOR_VAR: "8"}
            runs.append(session(webui, prompts, WAYS_FACTOR_8, "webui-factor8.log", 8 // factor))
    finally:
        # the tiny model's check expects only its own card in models/QRLoRA
        for path in installed["copies"]:
            os.remove(path)
    images = {label: imgs for run in runs for label, imgs in run["images"].items()}
    scores = {label: counts(imgs, prompts) for label, imgs in images.items() if label != "untagged again"}
    trainer = trainer_samples(args.demo, prompts)
    scores.update({label: counts(imgs, prompts) for label, imgs in trainer.items()})
    restored = compare(images["untagged"], images["untagged again"])
    # the same schedule as the trainer's sampler should give the trainer's images, up to rounding
    before = trainer.get("trainer, before training")
    after = next((imgs for label, imgs in trainer.items() if label.startswith("trainer, step")), None)
    versus = {"untagged, DDIM schedule vs trainer before": (images["untagged, DDIM schedule"], before),
              "tag 1, DDIM schedule vs trainer after": (images["tag 1, DDIM schedule"], after),
              "untagged vs trainer before": (images["untagged"], before),
              "tag 1 vs trainer after": (images["tag 1"], after)}
    versus = {k: compare(a, b) for k, (a, b) in versus.items() if b is not None}
    for label in ("untagged", "tag 1"):  # what the size conditioning of 128 instead of 32 changes
        if label + FACTOR_8 in images:
            versus[f"{label}{FACTOR_8} vs factor 2, 32x32 asked"] = compare(images[label + FACTOR_8], images[label])
    sizes = {image.size for imgs in images.values() for image in imgs}
    checks = {"every image 32x32": sizes == {(32, 32)}}
    for suffix in ("",) + ((FACTOR_8,) if len(runs) > 1 else ()):
        checks[f"tag 1{suffix}: striped in >= {args.min_striped:g}"] = \
            scores["tag 1" + suffix]["striped"] >= args.min_striped * n
        checks[f"untagged{suffix}: no stripes"] = scores["untagged" + suffix]["striped"] == 0
    checks["untagged after tagged: bit-identical to the first untagged"] = max(restored["max"]) == 0
    if before is not None and after is not None:
        checks["DDIM schedule: the trainer's samples within 2 of 255"] = all(
            max(v["max"]) <= 2 for k, v in versus.items() if "DDIM" in k)
    checks["QR-LoRA hashes in the tagged infotext"] = "QR-LoRA hashes" in runs[0]["infotexts"]["tag 1"]
    checks["console: no error block"] = not any(
        line.startswith(("*** ", "Traceback")) and not any(known in line for known in KNOWN_CONSOLE_ERRORS)
        for run in runs for line in run["console"].splitlines())
    grid_note = grid([images["untagged"], images["tag 1"]], args.grid)
    load_end = os.getloadavg()
    record = {
        "scores": scores, "samples": n, "checks": checks, "restore": restored, "versus_trainer": versus,
        "image_sizes": sorted(sizes), "installed": installed,
        "webui_start_seconds": [round(run["start_seconds"], 1) for run in runs],
        "generation_seconds": {k: round(v, 1) for run in runs for k, v in run["seconds"].items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average_start": load_start, "load_average_end": load_end,
        "basis_computed": any("computing the rank" in run["console"] for run in runs),
        "infotext_tag_1": runs[0]["infotexts"]["tag 1"], "grid": grid_note,
    }
    with open(os.path.join(webui.run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    lines = table(scores, n) + [""] + [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in checks.items()]
    lines += [""] + [f"- {k}: max pixel difference per image {v['max']}, mean {v['mean']}" for k, v in versus.items()]
    lines += ["", "WebUI start " + " / ".join(f"{run['start_seconds']:.1f} s" for run in runs) + "; 16 images each: "
              + ", ".join(f"{k} {v}" for k, v in record["generation_seconds"].items())
              + f" s; total {record['total_seconds']} s; load average {load_start[0]:.1f} -> {load_end[0]:.1f}; "
              f"basis {'computed' if record['basis_computed'] else 'from the basis folder'}; grid {grid_note}"]
    with open(os.path.join(webui.run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
