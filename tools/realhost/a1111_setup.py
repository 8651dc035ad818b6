"""Prepare a real Automatic1111 WebUI checkout for the QR-LoRA check on a CPU, offline.

    python tools/realhost/a1111_setup.py --webui /tmp/realhost/a1111 --work /tmp/realhost/work

Run it with a Python that has this project installed (``pip install -e .[test]`` plus
``pip install --no-deps open-clip-torch`` for CLIP's BPE file). Every step is idempotent,
so rerunning it after a failure continues where it stopped. What it does, and why:

1. ``repositories/``: the commits ``modules/launch_utils.py`` pins (generative-models,
   stablediffusion, k-diffusion and an empty assets folder) are extracted with
   ``git archive`` from local clones given with ``--git-dir NAME=DIR`` (or cloned when
   there is a network). BLIP is left out: the WebUI only warns.
2. A venv (``WORK/venv``) with ``torch==2.13.0`` and the WebUI's pinned requirements.
   Two pins cannot be met as written: torch 2.13 needs ``setuptools>=77.0.3`` (the file pins
   69.5.1), and the only ``torchvision`` wheel of an offline index may be a CUDA build whose
   compiled ops need ``libtorch_cuda.so``; ``torchvision/__init__.py`` is then patched to
   skip registering the missing ops (``patch_torchvision``). ``clip-anytorch`` is added
   without dependencies because k-diffusion's ``evaluation.py`` imports ``clip``.
3. The tiny SDXL (``qrlora make-tiny``) as ``models/Stable-diffusion/tiny-sdxl.safetensors``
   with a ``.yaml`` beside it, derived from the tiny model's own diffusers configs.
4. CLIP's tokenizer for TE1, offline: ``vocab.json``/``merges.txt`` derived from open_clip's
   BPE file (``trainer.tokenizers``) plus the tiny TE1's ``config.json``, in ``WORK/clip-tiny``
   (the yaml's TE1 ``version`` points there, so nothing is fetched from a hub).
5. TE2: an open_clip model config ``tiny-sdxl-te2.json`` in the venv's open_clip package.
6. sgm hard-codes 32 GroupNorm groups; the tiny model has 8-channel layers and was made
   with 4 groups, so the three places in ``repositories/generative-models/sgm`` are edited
   to read the groups from environment variables, 4 when unset (``patch_sgm_groupnorm``;
   the lab base needs 8 in the UNet and 1 in the VAE), and A1111's latent factor
   (``opt_f = 8`` in ``modules/processing.py``) likewise, 8 when unset
   (``patch_latent_factor``; the lab base's VAE has factor 2). This changes the WebUI copy
   only, never this project.
7. This project symlinked as ``extensions/qrlora``.
8. A venv for the check (``WORK/check-venv``: Playwright and Pillow); the browser is Debian's
   chromium (``apt-get install chromium``), as Playwright's own download may not be reachable.

No WebUI source is copied into this project; the patches are small text substitutions made
at run time on the user's copy, each checked to apply exactly where expected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_PIN = "torch==2.13.0"
SETUPTOOLS_FOR_TORCH = "setuptools>=77.0.3,<81"
TINY_NAME = "tiny-sdxl"
GROUPS = 4  # the tiny model's diffusers configs use norm_num_groups = 4
CHROMIUM = "/usr/bin/chromium"  # Debian's (apt-get install chromium); Playwright's own download is not used
sys.path.insert(0, PROJECT)  # trainer.tokenizers

# repositories/ folder -> the variable names in launch_utils.py that pin it
PINNED = {
    "generative-models": ("stable_diffusion_xl_repo", "stable_diffusion_xl_commit_hash", None),
    # the paths are what the WebUI imports; the rest holds large assets some mirrors lack
    "stable-diffusion-stability-ai": ("stable_diffusion_repo", "stable_diffusion_commit_hash", ["ldm", "configs"]),
    "k-diffusion": ("k_diffusion_repo", "k_diffusion_commit_hash", None),
}


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


# ------------------------------------------------------------------ 1. repositories
def pinned_sources(webui: str) -> dict[str, tuple[str, str]]:
    """repositories/ folder -> (url, commit) as the WebUI's launch_utils.py pins them."""
    with open(os.path.join(webui, "modules", "launch_utils.py"), encoding="utf-8") as f:
        text = f.read()

    def value(var: str) -> str:
        m = re.search(rf"{var} = os\.environ\.get\('[A-Z_]+', ['\"]([^'\"]+)['\"]\)", text)
        if not m:
            raise SystemExit(f"{webui}/modules/launch_utils.py: no '{var}' found; is this an A1111 checkout?")
        return m.group(1)

    return {name: (value(url), value(commit)) for name, (url, commit, _) in PINNED.items()}


def prepare_repositories(webui: str, git_dirs: dict[str, str]) -> None:
    repos = os.path.join(webui, "repositories")
    os.makedirs(os.path.join(repos, "stable-diffusion-webui-assets"), exist_ok=True)
    for name, (url, commit) in pinned_sources(webui).items():
        dest = os.path.join(repos, name)
        if os.path.isdir(dest) and os.listdir(dest):
            log(f"repositories/{name}: present")
            continue
        os.makedirs(dest, exist_ok=True)
        paths = PINNED[name][2] or []
        if name in git_dirs:
            # a mirror that lacks large asset blobs outside ``paths`` makes git print "invalid
            # object" for them; the archive of ``paths`` is still complete (exit status 0)
            archive = subprocess.run(["git", "-C", git_dirs[name], "archive", commit, *paths],
                                     check=True, stdout=subprocess.PIPE).stdout
            subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        else:
            shutil.rmtree(dest)
            run(["git", "clone", "--quiet", url, dest])
            run(["git", "-C", dest, "checkout", "--quiet", commit])
        log(f"repositories/{name}: {commit[:7]}")


# ------------------------------------------------------------------ 2. venv
def venv_python(work: str) -> str:
    return os.path.join(work, "venv", "bin", "python")


def site_packages(py: str) -> str:
    return subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()


def prepare_venv(webui: str, work: str, python: str) -> str:
    py = venv_python(work)
    marker = os.path.join(work, "venv", ".requirements-done")
    if os.path.isfile(marker):
        log("venv: present")
        return py
    if not os.path.isfile(py):
        run([python, "-m", "venv", os.path.join(work, "venv")])
    constraints = os.path.join(work, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write(TORCH_PIN + "\n")
    requirements = os.path.join(work, "requirements-cpu.txt")
    with open(os.path.join(webui, "requirements_versions.txt"), encoding="utf-8") as src, \
            open(requirements, "w", encoding="utf-8") as dst:
        for line in src:
            bare = line.split("#")[0].strip()
            if bare == "torch":
                continue  # installed first, pinned by the constraints file
            if bare.startswith("setuptools=="):
                line = SETUPTOOLS_FOR_TORCH + "  # torch 2.13 needs >= 77.0.3\n"
            dst.write(line)
    pip = [py, "-m", "pip", "install", "--quiet"]
    run(pip + [TORCH_PIN, "torchvision", "-c", constraints])
    run(pip + ["-r", requirements, "-c", constraints])
    run(pip + ["--no-deps", "clip-anytorch"])
    patch_torchvision(py)
    with open(marker, "w") as f:
        f.write("ok\n")
    return py


def patch_torchvision(py: str) -> None:
    """Let a CUDA torchvision wheel import next to a CPU torch: its meta/autograd kernels are
    registered only if its compiled ops exist (they do not without libtorch_cuda.so)."""
    ok = subprocess.run([py, "-c", "import torchvision"], capture_output=True)
    if ok.returncode == 0:
        log("torchvision imports as installed")
        return
    path = os.path.join(site_packages(py), "torchvision", "__init__.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = ("from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
           "    datasets,\n    io,\n    models,\n    ops,\n    transforms,\n    utils,\n)")
    if old not in text:
        raise SystemExit(f"{path}: the import to patch is not there; torchvision fails with:\n"
                         + ok.stderr.decode(errors="replace"))
    new = ("# qrlora realhost: register the fake/autograd kernels only if the compiled ops exist\n"
           "if hasattr(torch.ops.torchvision, 'nms'):\n"
           "    from torchvision import _autograd_registrations, _meta_registrations\n"
           "from torchvision import datasets, io, models, ops, transforms, utils")
    text = text.replace(old, new, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    check = subprocess.run([py, "-c", "import torchvision"], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"{path}: patched, but torchvision still fails to import:\n{check.stderr}")
    log("torchvision: patched to skip the missing compiled ops")


# ------------------------------------------------------------------ 3.-5. the tiny SDXL
def load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sgm_config(configs: str, clip_folder: str, te2_arch: str = TINY_NAME + "-te2") -> dict:
    """The WebUI's model config (an sgm ``DiffusionEngine``) for the tiny SDXL, read off the
    tiny model's diffusers configs (``a1111_lab.py`` adapts it to the lab base). Written as
    JSON, which YAML readers accept. ``te2_arch``: TE2's open_clip config name."""
    unet = load_json(os.path.join(configs, "unet", "config.json"))
    vae = load_json(os.path.join(configs, "vae", "config.json"))
    te1 = load_json(os.path.join(configs, "text_encoder", "config.json"))
    widths = unet["block_out_channels"]
    heads = unet["attention_head_dim"]  # diffusers' SDXL configs give head counts under this name
    head_channels = {w // h for w, h in zip(widths, heads)}
    if len(head_channels) != 1:
        raise SystemExit(f"{configs}/unet: head width differs between blocks ({head_channels})")
    def timestep_embedder(key):
        return {"is_trainable": False, "input_key": key,
                "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                "params": {"outdim": unet["addition_time_embed_dim"]}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": vae["scaling_factor"],
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": unet["projection_class_embeddings_input_dim"],
            "num_classes": "sequential",
            "use_checkpoint": False,
            "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"],
            "model_channels": widths[0],
            "attention_resolutions": [2 ** i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")],
            "num_res_blocks": unet["layers_per_block"],
            "channel_mult": [w // widths[0] for w in widths],
            "num_head_channels": head_channels.pop(),
            "use_spatial_transformer": True,
            "use_linear_in_transformer": unet["use_linear_projection"],
            "transformer_depth": unet["transformer_layers_per_block"],
            "context_dim": unet["cross_attention_dim"],
            "spatial_transformer_attn_type": "softmax",
            "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             # the penultimate hidden state, as SDXL uses
             "params": {"layer": "hidden", "layer_idx": te1["num_hidden_layers"] - 1, "version": clip_folder}},
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": te2_arch, "version": None, "freeze": True, "layer": "penultimate",
                        "always_return_pooled": True, "legacy": False}},
            timestep_embedder("original_size_as_tuple"),
            timestep_embedder("crop_coords_top_left"),
            timestep_embedder("target_size_as_tuple")]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": vae["latent_channels"],
            "monitor": "val/rec_loss",
            "ddconfig": {"attn_type": "vanilla", "double_z": True, "z_channels": vae["latent_channels"],
                         "resolution": 256, "in_channels": vae["in_channels"], "out_ch": vae["out_channels"],
                         "ch": vae["block_out_channels"][0],
                         "ch_mult": [w // vae["block_out_channels"][0] for w in vae["block_out_channels"]],
                         "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def open_clip_config(configs: str) -> dict:
    """open_clip's model config for the tiny TE2 (the vision tower is never used: sgm deletes it)."""
    te2 = load_json(os.path.join(configs, "text_encoder_2", "config.json"))
    width = te2["hidden_size"]
    return {"embed_dim": te2["projection_dim"],
            "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": width // te2["num_attention_heads"],
                           "patch_size": 16},
            "text_cfg": {"context_length": te2["max_position_embeddings"], "vocab_size": te2["vocab_size"],
                         "width": width, "heads": te2["num_attention_heads"], "layers": te2["num_hidden_layers"]}}


def prepare_model(webui: str, work: str, py: str) -> str:
    tiny = os.path.join(work, "tiny")
    if not os.path.isfile(os.path.join(tiny, TINY_NAME + ".safetensors")):
        run([sys.executable, "-m", "qrlora", "make-tiny", "--arch", "sdxl", "-o", tiny])
    configs = os.path.join(tiny, "config")
    models = os.path.join(webui, "models", "Stable-diffusion")
    os.makedirs(models, exist_ok=True)
    checkpoint = os.path.join(models, TINY_NAME + ".safetensors")
    if not os.path.isfile(checkpoint):
        shutil.copyfile(os.path.join(tiny, TINY_NAME + ".safetensors"), checkpoint)
    clip_folder = prepare_clip_tokenizer(work, configs)
    with open(os.path.join(models, TINY_NAME + ".yaml"), "w", encoding="utf-8") as f:
        json.dump(sgm_config(configs, clip_folder), f, indent=1)
    te2_config = os.path.join(site_packages(py), "open_clip", "model_configs", TINY_NAME + "-te2.json")
    with open(te2_config, "w", encoding="utf-8") as f:
        json.dump(open_clip_config(configs), f, indent=1)
    log(f"model: {checkpoint} (+ .yaml), TE1 tokenizer {clip_folder}, TE2 config {te2_config}")
    return checkpoint


def prepare_clip_tokenizer(work: str, configs: str, folder_name: str = "clip-tiny",
                           checkpoint: str | None = None) -> str:
    """CLIP's full tokenizer, derived offline from open_clip's BPE file, with TE1's config (from
    ``configs``) and weights (from ``checkpoint``, default the tiny SDXL) in ``WORK/folder_name``."""
    from trainer.tokenizers import BOS, EOS, full_clip_tokenizer_folder

    derived = full_clip_tokenizer_folder(os.path.join(work, "tokenizer-cache"))
    if derived is None:
        raise SystemExit("open_clip's BPE file is missing: pip install --no-deps open-clip-torch into this Python")
    folder = os.path.join(work, folder_name)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(derived):
        shutil.copyfile(os.path.join(derived, name), os.path.join(folder, name))
    shutil.copyfile(os.path.join(configs, "text_encoder", "config.json"), os.path.join(folder, "config.json"))
    write_te1_weights(checkpoint or os.path.join(work, "tiny", TINY_NAME + ".safetensors"), folder)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f)
    return folder


def write_te1_weights(checkpoint: str, folder: str) -> None:
    """TE1's weights beside its config. The WebUI builds the model without them, except when its
    quick build fails (a thread race in its start-up: "dictionary changed size during
    iteration" in importlib) and it retries with ``from_pretrained`` reading them for real."""
    from safetensors.torch import load_file, save_file

    prefix = "conditioner.embedders.0.transformer."
    tensors = {k[len(prefix):]: v for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
    if not tensors:
        raise SystemExit(f"{checkpoint}: no '{prefix}*' tensors (TE1)")
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------ 6. sgm GroupNorm, A1111's latent factor
# sgm hard-codes 32 GroupNorm groups. The patched copy reads the groups from the environment
# when sgm is imported, so one copy serves the tiny model (4 everywhere, the default) and the
# lab base (``a1111_lab.py``: UNet 8, VAE 1) in separate WebUI processes.
UNET_GROUPS_VAR, VAE_GROUPS_VAR = "QRLORA_SGM_UNET_GROUPS", "QRLORA_SGM_VAE_GROUPS"


def _from_env(var: str, default: int) -> str:
    # sgm's files import os under other names or not at all: no import line is added
    return f'int(__import__("os").environ.get("{var}", "{default}"))'


SGM_GROUPNORM_EDITS = {  # file under sgm/ -> (texts it may hold: original first, then older patches; replacement)
    "modules/diffusionmodules/model.py": (  # the VAE's Normalize
        ("def Normalize(in_channels, num_groups=32):", f"def Normalize(in_channels, num_groups={GROUPS}):  # qrlora realhost"),
        f"def Normalize(in_channels, num_groups={_from_env(VAE_GROUPS_VAR, GROUPS)}):  # qrlora realhost"),
    "modules/attention.py": (  # the UNet's SpatialTransformer norm
        ("num_groups=32, num_channels=in_channels", f"num_groups={GROUPS}, num_channels=in_channels"),
        f"num_groups={_from_env(UNET_GROUPS_VAR, GROUPS)}, num_channels=in_channels"),
    "modules/diffusionmodules/util.py": (  # the UNet's ResBlocks
        ("return GroupNorm32(32, channels)", f"return GroupNorm32({GROUPS}, channels)  # qrlora realhost"),
        f"return GroupNorm32({_from_env(UNET_GROUPS_VAR, GROUPS)}, channels)  # qrlora realhost"),
}


def replace_once(path: str, olds: tuple[str, ...], new: str) -> None:
    """Replace the first of ``olds`` found (each must occur once) by ``new``; nothing if ``new`` is
    there. Line endings are kept as they are (A1111's processing.py has CRLF)."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if new in text:
        return
    for old in olds:
        if text.count(old) == 1:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text.replace(old, new))
            return
    raise SystemExit(f"{path}: expected '{olds[0]}' exactly once; is this the pinned commit?")


def patch_sgm_groupnorm(webui: str) -> None:
    sgm = os.path.join(webui, "repositories", "generative-models", "sgm")
    for rel, (olds, new) in SGM_GROUPNORM_EDITS.items():
        replace_once(os.path.join(sgm, rel), olds, new)
    log(f"sgm: GroupNorm groups from ${UNET_GROUPS_VAR} (UNet) and ${VAE_GROUPS_VAR} (VAE), default {GROUPS}")


# A1111 sizes the initial latent as image size // 8 (``opt_f``), SDXL's VAE factor; the lab base's
# VAE has factor 2. The patched copy reads it from the environment (default 8, unchanged).
LATENT_FACTOR_VAR = "QRLORA_A1111_LATENT_FACTOR"


def patch_latent_factor(webui: str) -> None:
    # the line's own ending (CRLF in v1.10.1) stays after the replaced text
    replace_once(os.path.join(webui, "modules", "processing.py"), ("\nopt_f = 8",),
                 f'\nopt_f = int(os.environ.get("{LATENT_FACTOR_VAR}", "8"))  # qrlora realhost')
    log(f"processing.py: the latent factor from ${LATENT_FACTOR_VAR}, default 8")


# ------------------------------------------------------------------ 7. the extension
def link_extension(webui: str) -> None:
    """This project as ``extensions/qrlora`` (the check writes the ΔR and LoRA files itself, with
    the project's code of the day)."""
    link = os.path.join(webui, "extensions", "qrlora")
    if not os.path.islink(link):
        os.symlink(PROJECT, link)
    for folder in ("QRLoRA", "Lora"):
        os.makedirs(os.path.join(webui, "models", folder), exist_ok=True)
    log(f"extension: {link} -> {PROJECT}")


# ------------------------------------------------------------------ 8. the check's browser
def prepare_check_venv(work: str, python: str) -> None:
    """Playwright (and Pillow for pixel comparisons) in their own venv, apart from the WebUI's pins."""
    py = os.path.join(work, "check-venv", "bin", "python")
    if not os.path.isfile(py):
        run([python, "-m", "venv", os.path.join(work, "check-venv")])
    if subprocess.run([py, "-c", "import playwright, PIL"], capture_output=True).returncode != 0:
        run([py, "-m", "pip", "install", "--quiet", "playwright", "pillow"])
    if not os.path.isfile(CHROMIUM):
        log(f"warning: {CHROMIUM} is missing: apt-get install -y chromium (or pass --chromium to the check)")
    log(f"check venv: {py}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, help="the A1111 checkout (v1.10.1)")
    parser.add_argument("--work", required=True, help="folder for the venv, the tiny model and the tokenizer")
    parser.add_argument("--python", default="python3.11", help="interpreter for the WebUI's venv (3.10 or 3.11)")
    parser.add_argument("--git-dir", action="append", default=[], metavar="NAME=DIR",
                        help="a local clone to take repositories/NAME from (generative-models, "
                             "stable-diffusion-stability-ai, k-diffusion); repeatable")
    args = parser.parse_args(argv)
    webui, work = os.path.abspath(args.webui), os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    git_dirs = dict(item.split("=", 1) for item in args.git_dir)
    prepare_repositories(webui, git_dirs)
    py = prepare_venv(webui, work, args.python)
    prepare_model(webui, work, py)
    patch_sgm_groupnorm(webui)
    patch_latent_factor(webui)
    link_extension(webui)
    prepare_check_venv(work, args.python)
    log("done")


if __name__ == "__main__":
    main()
