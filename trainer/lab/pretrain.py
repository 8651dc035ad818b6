"""Pretraining the lab base model on the world (``python -m trainer.lab pretrain``).

Only the UNet trains. The text encoders are built, not trained (``model.word_vector_encoders``
and ``model.pooled_caption_summary``) and stay frozen, so every caption's conditioning is
computed once. Images are drawn fresh every step from a generator seeded by (seed, step), and
each step's noise and timesteps likewise, so a run is a function of its recipe (and the
thread count, through float summation order). The loss, noise schedule, conditioning and
sampler are the trainer's own SDXL ones (``trainer.families.sdxl``), so the model is trained
exactly as adapters on it will be. Weights are an EMA of the UNet's.

Evaluation samples captions held out of training (combinations never seen, every single word
seen) and reads the images with ``trainer.lab.score``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from qrlora.errors import IncompatibleFiles

from . import model as lab_model
from . import score, world

# The base world: four shapes, solid, every colour and background. The other shapes and the
# patterns are left for adapters to teach.
BASE_VOCABULARY = world.Vocabulary(shapes=("circle", "square", "triangle", "cross"), patterns=("solid",))
HELD_OUT_EVERY = 5
SPOT_CHECK = 32  # samples


@dataclass
class Recipe:
    seed: int = 0
    steps: int = 1400
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance is possible
    max_grad_norm: float = 1.0
    # Off: min-SNR weighting (γ = 5) all but removes the noisiest timesteps from a v-prediction
    # loss (their weight is their SNR, 0.005 at the last one), where the caption decides the shape
    min_snr_gamma: float = 0.0
    cross_attention_lr_scale: float = 3.0  # the text's keys, queries and values (attn2.to_q/k/v) learn faster
    # Training timesteps t = T·(1 − (1 − u)^bias), u uniform: 1 is uniform; above 1 favours the
    # noisy end, where the image does not yet show its shape and only the caption can
    timestep_bias: float = 1.0
    noise_offset: float = 0.1  # without it, backgrounds come out mid-gray (the schedule keeps the mean)
    eval_samples: int = 96
    eval_steps: int = 20
    eval_sampler: str = "euler_a"
    eval_guidance: float = 1.0
    threads: int = 2
    prediction_type: str = "v_prediction"  # or "epsilon" (recorded in config/scheduler/)
    attention: str = "both"  # cross-attention at both levels, or at the low level only ("low", SDXL's layout)
    vae_factor: int = 2  # 2: the 2x2-block VAE (16x16 latents); 1: pixel space behind an identity VAE
    pooled_summary: bool = True  # TE2's pooled output summarises the caption (model.pooled_caption_summary)


def base_combinations() -> tuple[list, set]:
    """(training combinations, held-out combinations) of the base world."""
    held = world.held_out(BASE_VOCABULARY, HELD_OUT_EVERY)
    return [c for c in BASE_VOCABULARY.combinations() if c not in held], held


def memory_models(components: dict, family, prediction_type: str = "epsilon"):
    """A trainer ``Models`` around in-memory components (the loader's conventions: CLIP
    tokenizers, SDXL base's DDPM schedule), for training before any file exists."""
    from diffusers import DDPMScheduler

    from trainer.families import Models, cache_root
    from trainer.families import sdxl_load as L
    from trainer.families.sdxl import PAD_TOKENS
    from trainer.tokenizers import resolve_clip_tokenizers

    tokenizers, source = resolve_clip_tokenizers(PAD_TOKENS, None, None, cache_root("tokenizers"), False)
    for m in components.values():
        m.requires_grad_(False).eval()
    return Models(
        family=family.name, denoiser=components["unet"], vae=components["vae"],
        text_encoders=[components["text_encoder"], components["text_encoder_2"]], tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_config(L.scheduler_config(prediction_type=prediction_type)), basis_source=None, identity="lab-pretrain",
        weight_dtype=torch.float32, vae_dtype=torch.float32, device=torch.device("cpu"), tokenizer_source=getattr(source, "description", str(source)),
    )


def vocabulary_separation(family, models, vocab: world.Vocabulary = BASE_VOCABULARY) -> float:
    """The largest cosine between the conditioning of two captions differing in one word: how
    well the frozen random encoders tell the words apart (1.0 would be indistinguishable)."""
    combos = vocab.combinations()
    captions = [world.caption(world.Scene(*c, 16, 16, 16)) for c in combos]
    conds = family.encode_prompts(models, captions)
    flat = torch.cat([conds["encoder_hidden_states"].flatten(1), conds["text_embeds"]], dim=1)
    flat = flat - flat.mean(dim=0)  # what tells captions apart, not what they share
    flat = torch.nn.functional.normalize(flat, dim=1)
    cos = flat @ flat.T
    worst = -1.0
    for i, a in enumerate(combos):
        for j, b in enumerate(combos):
            if i < j and sum(x != y for x, y in zip(a, b)) == 1:
                worst = max(worst, cos[i, j].item())
    return worst


def word_mixing(family, models, vocab: world.Vocabulary = BASE_VOCABULARY) -> float:
    """How much one word leaks into the other positions' conditioning: over every pair of
    captions differing in one word (with the same token count), the largest ratio of the
    conditioning's change at the positions whose tokens are the same to its change at those
    that differ (0: each position carries only its own word)."""
    combos = vocab.combinations()
    captions = [world.caption(world.Scene(*c, 16, 16, 16)) for c in combos]
    hidden = family.encode_prompts(models, captions)["encoder_hidden_states"]
    ids = models.tokenizers[0](captions, padding="max_length", max_length=hidden.shape[1], truncation=True,
                               return_tensors="pt").input_ids
    worst = 0.0
    for i, a in enumerate(combos):
        for j, b in enumerate(combos):
            if i < j and sum(x != y for x, y in zip(a, b)) == 1:
                differs = ids[i] != ids[j]
                if (ids[i] == models.tokenizers[0].eos_token_id).nonzero()[0] != (ids[j] == models.tokenizers[0].eos_token_id).nonzero()[0]:
                    continue  # a two-token word (cyan) shifts every later position
                change = (hidden[i] - hidden[j]).norm(dim=-1)
                worst = max(worst, (change[~differs].norm() / change[differs].norm()).item())
    return worst


def _lr(step: int, r: Recipe) -> float:
    return r.learning_rate * min(1.0, (step + 1) / max(1, r.warmup_steps))


def train(recipe: Recipe, say=print, probe=None, probe_every: int = 0) -> dict:
    """Train the UNet; returns the components with the EMA UNet in place, and the loss curve.
    ``probe(step, components)``, if given, is called every ``probe_every`` steps with the EMA
    UNet in place (a short run's progress check; it must not change the weights)."""
    from trainer.families import get_family

    torch.set_num_threads(recipe.threads)
    family = get_family("sdxl")
    components = lab_model.build(recipe.seed, recipe.attention, recipe.vae_factor, recipe.pooled_summary)
    models = memory_models(components, family, recipe.prediction_type)
    train_combos, _ = base_combinations()
    captions = sorted({world.caption(world.Scene(*c, 16, 16, 16)) for c in train_combos}) + [""]
    with torch.no_grad():
        table = family.encode_prompts(models, captions)
    index = {c: i for i, c in enumerate(captions)}

    unet = models.denoiser
    unet.requires_grad_(True).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    params = [p for p in unet.parameters() if p.requires_grad]
    text_reading = [p for n, p in unet.named_parameters() if ".attn2.to_" in n and ".to_out" not in n]
    others = [p for p in params if all(p is not q for q in text_reading)]
    opt = torch.optim.AdamW([{"params": others, "scale": 1.0},
                             {"params": text_reading, "scale": recipe.cross_attention_lr_scale}],
                            lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    losses, loads, start = [], [], time.time()
    for step in range(recipe.steps):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        scenes = world.sample_scenes(recipe.batch_size, seed=int(torch.randint(0, 2**62, (1,), generator=g)),
                                     combos=train_combos)
        pixels = world.to_pixels(world.render_batch(scenes))
        latents = family.encode_images(models, pixels, g)
        drop = torch.rand(recipe.batch_size, generator=g) < recipe.caption_dropout
        rows = torch.tensor([index[""] if d else index[world.caption(s)] for s, d in zip(scenes, drop.tolist())])
        conds = {k: v[rows] for k, v in table.items()}
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe) * group["scale"]
        timesteps = None
        if recipe.timestep_bias != 1.0:
            total = models.noise_scheduler.config.num_train_timesteps
            u = torch.rand(recipe.batch_size, generator=g)
            timesteps = (total * (1 - (1 - u) ** recipe.timestep_bias)).long().clamp(0, total - 1)
        loss = family.training_loss(models, {"latents": latents}, conds, generator=g, noise_offset=recipe.noise_offset,
                                    min_snr_gamma=recipe.min_snr_gamma, timesteps=timesteps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        with torch.no_grad():
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # short runs: a warming EMA
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if probe is not None and probe_every and (step + 1) % probe_every == 0 and step + 1 < recipe.steps:
            probe(step + 1, {**components, "unet": ema})
        if step % 50 == 0 or step == recipe.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            loads.append(os.getloadavg()[0])
            say(f"step {step + 1}/{recipe.steps}  loss {recent:.4f}  {time.time() - start:.0f} s")
    components["unet"] = ema
    return {"components": components, "losses": losses, "train_seconds": time.time() - start,
            "load_average": sum(loads) / len(loads),
            "scheduler": models.noise_scheduler.config}


def evaluate(family, models, recipe: Recipe, n: int | None = None, seed: int = 12345, split: str = "heldout") -> dict:
    """Sample ``n`` captions (fixed scenes and seeds) of the held-out combinations (``split``
    "heldout") or of the training ones ("train") and score them."""
    from .sample import sample_batch

    n = recipe.eval_samples if n is None else n
    train_combos, held = base_combinations()
    combos = sorted(held) if split == "heldout" else sorted(train_combos)
    # one generator per scene, so the first k scenes (and images) do not depend on n
    scenes = [world.sample_scenes(1, seed=seed + i, combos=combos)[0] for i in range(n)]
    images = sample_batch(family, models, [world.caption(s) for s in scenes], [seed + i for i in range(n)],
                          steps=recipe.eval_steps, guidance_scale=recipe.eval_guidance, sampler=recipe.eval_sampler)
    readings = score.read_batch(images, shapes=BASE_VOCABULARY.shapes, patterns=BASE_VOCABULARY.patterns)
    acc = score.accuracy(readings, scenes)
    out = {"samples": n, "eval_seed": seed, **{k: round(v, 4) for k, v in acc.items()}}
    if n > SPOT_CHECK:  # what a quick re-check (the tests) reproduces
        out["first_%d" % SPOT_CHECK] = {k: round(v, 4) for k, v in score.accuracy(readings[:SPOT_CHECK], scenes[:SPOT_CHECK]).items()}
    return {**out, "images": images}


def pretrain(out: str, recipe: Recipe, say=print, probe=None, probe_every: int = 0) -> dict:
    """Train, write ``out`` (+ ``config/`` and ``<stem>.json`` beside it), reload it through the
    trainer's SDXL loader and score held-out captions; returns the report. ``probe``: see ``train``."""
    t0 = time.time()
    result = train(recipe, say, probe, probe_every)
    folder = os.path.dirname(os.path.abspath(out))
    config_dir = os.path.join(folder, "config")
    meta = {"qrlora.lab": json.dumps({"recipe": dataclasses.asdict(recipe)}, sort_keys=True)}
    lab_model.write(result["components"], out, config_dir, meta, scheduler=dict(result["scheduler"]))

    report = {
        "file": os.path.basename(out), "recipe": dataclasses.asdict(recipe),
        "final_loss": round(sum(result["losses"][-50:]) / len(result["losses"][-50:]), 5),
        "train_seconds": round(result["train_seconds"], 1),
        "load_average": round(result["load_average"], 1),  # the 1-minute load average, mean over the run
    }
    report = evaluate_file(out, config_dir, recipe, report)
    report["total_seconds"] = round(time.time() - t0, 1)
    _write_report(out, report)
    return report


def evaluate_file(path: str, config_dir: str, recipe: Recipe, report: dict, samples: int | None = None,
                  write: bool = True) -> dict:
    """Load ``path`` through the trainer's SDXL loader, score ``samples`` held-out captions
    (the recipe's count by default), save a grid of the first 64 beside it (``write``);
    ``report`` with the figures added."""
    from trainer.families import get_family

    family = get_family("sdxl")
    models = load(path, config_dir)
    loaded = models.noise_scheduler.config.prediction_type
    if loaded != recipe.prediction_type:  # the schedule travels in config/scheduler/: it must have
        raise IncompatibleFiles(f"{config_dir}: the scheduler config says prediction_type {loaded!r}, but "
                              f"{os.path.basename(path)} was trained with {recipe.prediction_type!r}")
    ev = evaluate(family, models, recipe, n=samples)
    images = ev.pop("images")
    if write:
        save_grid(images[:64], os.path.splitext(path)[0] + "-heldout.png")
    return {**report, "heldout": ev, "vocabulary_max_cosine": round(vocabulary_separation(family, models), 4),
            "word_mixing": round(word_mixing(family, models), 6)}


def _write_report(path: str, report: dict) -> None:
    from qrlora.checkpoint import write_bytes_atomic

    text = json.dumps(report, indent=1, sort_keys=True) + "\n"
    write_bytes_atomic(os.path.splitext(path)[0] + ".json", text.encode("utf-8"))


def reevaluate(path: str, samples: int | None = None, write: bool = True) -> dict:
    """Score a lab base again with the recipe recorded in its report (on ``samples`` held-out
    captions, the recipe's count by default), and rewrite the report and grid (``write``)."""
    report_path = os.path.splitext(path)[0] + ".json"
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    recipe = Recipe(**report["recipe"])
    report = evaluate_file(path, os.path.join(os.path.dirname(os.path.abspath(path)), "config"), recipe, report,
                           samples, write)
    if write:
        _write_report(path, report)
    return report


def load(path: str, config_dir: str, prediction_type: str | None = None):
    """The lab base through the trainer's SDXL loader, as ``python -m trainer`` loads it (the
    prediction type from ``config_dir``'s scheduler config unless given)."""
    from types import SimpleNamespace

    from trainer.families import get_family

    cfg = SimpleNamespace(pretrained=path, config_dir=config_dir, tokenizer=None, vae=None,
                          prediction_type=prediction_type)
    return get_family("sdxl").load(cfg, "cpu", torch.float32)


def save_grid(images: torch.Tensor, path: str, columns: int = 8, scale: int = 4) -> None:
    """[-1, 1] images -> one PNG grid, each image scaled up ``scale`` times (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = u8[i]
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)
