"""Peak GPU memory of a training run, estimated from the model's real module graph.

Nothing is allocated: the models are built under torch's ``FakeTensorMode`` (tensors with a
shape, a dtype and a device but no data), so FLUX.1-dev's 12 billion parameters cost nothing
and the figures come from the same diffusers/transformers classes the trainer loads, not from
per-family constants. What is counted:

- frozen weights: every parameter and buffer of the components kept on the device, in the
  dtype the run stores them in (``mixed_precision``; FLUX's transformer in float8_e4m3fn
  with ``fp8_base``); the text encoders only while they are resident (their outputs not cached);
- adapters: the run's own ``AdapterNetwork`` (ΔR or LoRA factors, and Q buffers) built on
  the fake layers, its gradients, and the optimizer state measured by taking one real
  optimizer step on the fake parameters (AdamW, SGD; 8-bit AdamW and Prodigy by their
  documented state sizes);
- activations: one forward of the denoiser with the adapters applied, at the largest bucket
  and the batch size, under the run's autocast, with a saved-tensor hook adding up every
  distinct storage autograd keeps for the backward pass (frozen weights not counted twice).
  With gradient checkpointing, each checkpointed block keeps only its inputs and one block
  is recomputed at a time during backward: the figure is what the forward keeps plus the
  largest single block's saved tensors.

Assumptions, printed with the figures: attention runs a flash-style SDPA kernel, which keeps
O(tokens) per head (``attention="math"`` counts the materialised attention matrix; on this
CPU's fake kernels it is kept in float32); the CUDA context, the caching allocator's slack,
transient buffers of a single operation and the VAE's own encode pass (latents not cached)
are not included. ``bench/gpu_check.py`` compares these figures with a GPU's measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.memory_shapes import MODELS, T5_XXL, ModelShapes, NoShapes, flux_shapes, sdxl_shapes, shapes_for  # noqa: F401  (re-exported)

MIB = 2**20
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
ATTENTION = ("flash", "math")
# Built-in shape sets (``--model``): the released models' configs and the tiny test models'.

@dataclass(frozen=True)
class RunSettings:
    """Everything that changes the figure."""

    model: str  # one of MODELS, or a path whose shapes are read (see ``shapes_for``)
    config_dir: str | None = None  # model.config_dir: diffusers configs for a single file
    mixed_precision: str = "bf16"
    fp8_base: bool = False
    network_type: str = "qrlora"
    rank: int = 16
    alpha: float | None = None
    mask: str = "triu"
    targets: Any = None  # preset or patterns; None: the family's default preset
    train_text_encoder: bool = False
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    batch_size: int = 1
    bucket: tuple[int, int] = (1024, 1024)  # (width, height) of the largest bucket
    gradient_checkpointing: bool = True
    text_encoders: str = "resident"  # on the GPU; "freed": outputs cached, encoders dropped; "offloaded": CPU
    t5_tokens: int | None = None  # FLUX: t5xxl_max_token_length; None: 512 (dev), 256 (schnell)
    attention: str = "flash"


@dataclass
class Row:
    component: str
    bytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    settings: RunSettings
    description: str  # the model and run, one line
    rows: list[Row]  # summed into the total
    activations: dict[bool, int]  # gradient_checkpointing -> bytes; the configured one is in rows
    targets: int
    assumptions: str

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    def to_dict(self) -> dict:
        return {"model": self.settings.model, "description": self.description, "total_bytes": self.total,
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "activations_bytes": {"checkpointing": self.activations[True], "no_checkpointing": self.activations[False]},
                "assumptions": self.assumptions, "text": self.format()}

    def format(self) -> str:
        width = max(len(r.component) for r in self.rows) + 2
        lines = [f"peak GPU memory estimate: {self.description}", f"  {'component':<{width}}{'MiB':>10}"]
        for r in self.rows:
            lines.append(f"  {r.component:<{width}}{r.bytes / MIB:>10,.1f}" + (f"  {r.note}" if r.note else ""))
        lines.append(f"  {'total':<{width}}{self.total / MIB:>10,.1f}  = {self.total / 2**30:.2f} GiB")
        other = not self.settings.gradient_checkpointing
        delta = self.activations[other] - self.activations[not other]
        lines.append(f"  activations {'with' if other else 'without'} gradient checkpointing would be "
                     f"{self.activations[other] / MIB:,.1f} MiB (total {(self.total + delta) / 2**30:.2f} GiB)")
        lines.append(f"  method: {self.assumptions}")
        return "\n".join(lines)


# ----------------------------------------------------------------- counting
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward while active (a
    ``saved_tensors_hooks`` pair); storages in ``exclude`` (weights, counted elsewhere) are
    skipped. References are kept so that no storage id is reused while counting."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.kept: dict[int, torch.Tensor] = {}

    @property
    def bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.kept.values())

    def add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.kept:
            self.kept[key] = t

    def hooks(self):
        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class CheckpointCounter:
    """Stands in for diffusers' gradient-checkpointing function: what checkpointing keeps of a
    block is its tensor inputs (added to the outer count); the block's own saved tensors live
    only while it is recomputed in backward, one block at a time (the largest is kept)."""

    def __init__(self, outer: SavedTensors):
        self.outer = outer
        self.largest_block = 0

    def __call__(self, block, *args):
        for a in args:
            if isinstance(a, torch.Tensor):
                self.outer.add(a)
            elif isinstance(a, (tuple, list)):
                for t in a:
                    if isinstance(t, torch.Tensor):
                        self.outer.add(t)
        inner = SavedTensors(self.outer.exclude)
        with inner.hooks():
            out = block(*args)
        self.largest_block = max(self.largest_block, inner.bytes)
        return out


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    # Module.to() cannot swap fake parameters in place; replacing them is equivalent here.
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point():
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def store_fp8(transformer: nn.Module) -> None:
    """The FLUX loader's ``fp8_base``: every Linear weight stored float8_e4m3fn and upcast per
    call (its ``Fp8Linear``); biases, norms and embeddings stay in the compute dtype."""
    from trainer.families.flux_load import Fp8Linear

    for m in transformer.modules():
        if type(m) is nn.Linear:
            m._parameters["weight"] = nn.Parameter(m.weight.detach().to(FP8), requires_grad=False)
            m.__class__ = Fp8Linear


def tensor_bytes(module: nn.Module) -> dict[torch.dtype, int]:
    """Bytes of a module's distinct parameters and buffers, by dtype."""
    out: dict[torch.dtype, int] = {}
    seen = set()
    for t in [*module.parameters(), *module.buffers()]:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out


def _dtype_note(by_dtype: dict[torch.dtype, int]) -> str:
    return ", ".join(f"{str(d).replace('torch.', '')} {b / MIB:,.1f}" for d, b in sorted(by_dtype.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------- the estimate
def estimate(s: RunSettings, shapes: ModelShapes | None = None) -> MemoryEstimate:
    """The estimate of run ``s``; ``shapes`` overrides the model ``s.model`` names (say, a
    FLUX of real width and fewer blocks, as bench/gpu_check.py trains)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if s.attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {s.attention!r}")
    shapes = shapes or shapes_for(s.model, s.t5_tokens, s.config_dir)
    weight_dtype = DTYPES[s.mixed_precision]
    with FakeTensorMode(allow_non_fake_inputs=False), torch.random.fork_rng(devices=[]):
        denoiser = shapes.denoiser()
        vae = shapes.vae()
        encoders = [b() for b in shapes.text_encoders]
        cast_parameters(denoiser, weight_dtype)
        if s.fp8_base and shapes.family == "flux":
            store_fp8(denoiser)
        # the trainer keeps SDXL's VAE in float32 under fp16 (it overflows there); the same rule for FLUX's
        cast_parameters(vae, torch.float32 if weight_dtype == torch.float16 else weight_dtype)
        for te in encoders:
            cast_parameters(te, weight_dtype)
        for m in (denoiser, vae, *encoders):
            m.requires_grad_(False)

        names, modules = target_modules(s, shapes, denoiser, encoders)
        in_denoiser = set(denoiser.modules())
        te_trained = any(m not in in_denoiser for m in modules.values())
        network = adapter_network(s, modules)
        network.apply()
        rows = _weight_rows(s, shapes, denoiser, vae, encoders, te_trained)
        adapter = sum(tensor_bytes(network).values())
        params = sum(p.numel() * p.element_size() for p in network.trainable_parameters())
        kind = "ΔR + Q buffers" if s.network_type == "qrlora" else "LoRA up + down"
        rows.append(Row(f"adapters ({len(names)} layers, r={s.rank})", adapter, kind + ", float32"))
        rows.append(Row("adapter gradients", params, "float32"))
        rows.append(Row(f"optimizer state ({s.optimizer})", optimizer_state_bytes(s, network), _OPT_NOTES.get(s.optimizer.lower(), "")))
        activations = {ckpt: _activations(s, shapes, denoiser, encoders if te_trained else [], network, ckpt)
                       for ckpt in (False, True)}
    configured = activations[s.gradient_checkpointing]
    w, h = s.bucket
    rows.append(Row(f"activations ({'with' if s.gradient_checkpointing else 'without'} gradient checkpointing)", configured,
                    f"batch {s.batch_size} at {w}x{h}, {s.attention} attention"))
    fp8 = ", fp8 base" if s.fp8_base and shapes.family == "flux" else ""
    precision = "fp32" if s.mixed_precision == "no" else s.mixed_precision
    description = (f"{shapes.name}, {s.network_type} r={s.rank}, {len(names)} targets, {precision}{fp8}, "
                   f"{s.optimizer}, batch {s.batch_size} at {w}x{h}, gradient checkpointing "
                   f"{'on' if s.gradient_checkpointing else 'off'}, text encoders "
                   f"{'resident' if te_trained else _TE_PLACES[s.text_encoders]}")
    return MemoryEstimate(s, description, rows, activations, len(names), assumptions(s))


def assumptions(s: RunSettings) -> str:
    kernel = ("flash-style SDPA (keeps q, k, v, output and the log-sum-exp per head, no attention matrix)"
              if s.attention == "flash" else "math SDPA (keeps the full attention matrix, float32 on the CPU's kernel)")
    return (f"the run's modules built on fake tensors (no memory); weights and adapters counted by dtype; activations = "
            f"storages autograd saves in one forward at the largest bucket under the run's autocast, with the adapters "
            f"applied; with checkpointing, the block inputs plus the largest block recomputed in backward; attention: "
            f"{kernel}; not included: the CUDA context, allocator slack, one operation's transient buffers, the VAE "
            f"encode (latents not cached)")


_OPT_NOTES = {"adamw": "2 float32 states + step, measured by one step", "sgd": "momentum buffer if momentum > 0, measured",
              "adamw8bit": "2 uint8 states + block scales (bitsandbytes' sizes)", "prodigy": "4 float32 states (prodigyopt's sizes)"}


def optimizer_state_bytes(s: RunSettings, network) -> int:
    """AdamW and SGD: one real step on the (fake) parameters, then the state's bytes. 8-bit AdamW
    and Prodigy run only on their own packages and devices: their documented state sizes."""
    from trainer.optim import make_optimizer

    params = network.trainable_parameters()
    key = s.optimizer.lower()
    if key == "adamw8bit":
        # bitsandbytes keeps parameters under 4096 elements in 32-bit; larger ones as two uint8
        # states with one float32 scale per 256-element block
        return sum(8 * p.numel() if p.numel() < 4096 else 2 * p.numel() + 8 * -(-p.numel() // 256) for p in params)
    if key == "prodigy":
        return sum(4 * p.numel() * p.element_size() for p in params)
    optimizer = make_optimizer(s.optimizer, [{"params": params}], 1e-4, s.optimizer_args)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    total = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    for p in params:
        p.grad = None
    return total


def target_modules(s: RunSettings, shapes: ModelShapes, denoiser, encoders) -> tuple[list[str], dict]:
    """The run's target layer names (the trainer's selection) and their fake nn.Linear modules."""
    from types import SimpleNamespace

    from qrlora import archs
    from trainer.setup import select_targets, text_encoder_names

    arch = archs.get(shapes.family)
    if shapes.family == "sdxl":
        from qrlora.tiny.sdxl import sgm_state_dict

        original = sgm_state_dict(denoiser.state_dict(), encoders[0].state_dict(), encoders[1].state_dict())
        components = {"unet": denoiser, "te1": encoders[0], "te2": encoders[1]}
    else:
        from qrlora.archs.flux import diffusers_to_bfl

        original = diffusers_to_bfl(denoiser.state_dict())
        components = {"transformer": denoiser}
    all_targets = arch.linear_targets({k: tuple(v.shape) for k, v in original.items()})
    cfg = SimpleNamespace(network=SimpleNamespace(targets=s.targets, train_text_encoder=s.train_text_encoder))
    chosen = select_targets(cfg, SimpleNamespace(name=shapes.family), all_targets, text_encoder_names(arch, all_targets))
    lookup = {}
    for prefix, module in components.items():
        for path, m in module.named_modules():
            if isinstance(m, nn.Linear):
                lookup[f"{prefix}.{path}"] = m
                if prefix.startswith("te") and not path.startswith("text_model."):  # transformers 5 dropped the level
                    lookup[f"{prefix}.text_model.{path}"] = m
    names = [t.name for t in chosen]
    return names, {t.name: lookup[t.name] for t in chosen}


def adapter_network(s: RunSettings, modules, q: dict | None = None):
    """The run's AdapterNetwork on ``modules`` (Q: ``q``, else uninitialised of the right shape)."""
    from trainer.network import AdapterNetwork

    alpha = s.alpha if s.alpha is not None else float(s.rank)
    if s.network_type == "qrlora":
        q = q or {n: torch.empty(m.out_features, s.rank) for n, m in modules.items()}
        return AdapterNetwork.qrlora(modules, q, alpha, s.mask)
    return AdapterNetwork.lora(modules, s.rank, alpha)


_TE_PLACES = {"resident": "resident", "freed": "freed (outputs cached)", "offloaded": "offloaded to the CPU"}


def _weight_rows(s: RunSettings, shapes, denoiser, vae, encoders, te_trained: bool) -> list[Row]:
    rows = []
    main = tensor_bytes(denoiser)
    rows.append(Row(f"{'unet' if shapes.family == 'sdxl' else 'transformer'} weights", sum(main.values()), _dtype_note(main)))
    v = tensor_bytes(vae)
    rows.append(Row("vae weights", sum(v.values()), _dtype_note(v)))
    te = {}
    for e in encoders:
        for d, b in tensor_bytes(e).items():
            te[d] = te.get(d, 0) + b
    if s.text_encoders not in _TE_PLACES:
        raise ValueError(f"text_encoders must be one of {', '.join(_TE_PLACES)}, got {s.text_encoders!r}")
    if s.text_encoders == "resident" or te_trained:
        rows.append(Row("text encoder weights", sum(te.values()), _dtype_note(te)))
    else:
        rows.append(Row("text encoder weights", 0, f"{_TE_PLACES[s.text_encoders]}: {sum(te.values()) / MIB:,.1f} MiB"
                                                   " off the GPU"))
    return rows


def _activations(s: RunSettings, shapes: ModelShapes, denoiser, encoders, network, checkpointing: bool) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    weights = {_storage_key(t) for m in (denoiser, *encoders, network) for t in [*m.parameters(), *m.buffers()]}
    saved = SavedTensors(weights)
    counter = CheckpointCounter(saved)
    denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=counter)
    else:
        denoiser.disable_gradient_checkpointing()
    dtype = DTYPES[s.mixed_precision]
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    backend = SDPBackend.FLASH_ATTENTION if s.attention == "flash" else SDPBackend.MATH
    with saved.hooks(), autocast, sdpa_kernel(backend):
        _text_encoder_forward(s, shapes, encoders)
        pred, target = denoiser_forward(s, shapes, denoiser, dtype)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    del loss
    return saved.bytes + counter.largest_block


def _text_encoder_forward(s: RunSettings, shapes: ModelShapes, encoders) -> None:
    """Trained text encoders (``encoders``) run inside the counted forward; frozen ones are not
    passed: they run without gradients (or not at all, outputs cached), so the denoiser gets
    their outputs as plain inputs."""
    for te, tokens in zip(encoders, shapes.text_tokens):
        te(input_ids=torch.zeros(s.batch_size, tokens, dtype=torch.long))


def denoiser_forward(s: RunSettings, shapes: ModelShapes, denoiser, dtype):
    """(prediction, target) of one training forward at the largest bucket, as the families call it."""
    b, (w, h) = s.batch_size, s.bucket
    cfg = denoiser.config
    factor = shapes.vae_factor
    if shapes.family == "sdxl":
        latents = torch.randn(b, cfg.in_channels, h // factor, w // factor, dtype=dtype)
        hidden = torch.randn(b, 77, cfg.cross_attention_dim, dtype=dtype)
        pooled = torch.randn(b, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, dtype=dtype)
        pred = denoiser(latents, torch.ones(b), encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.ones(b, 6, dtype=dtype)}).sample
        return pred, torch.randn(pred.shape)
    lh, lw = h // factor // 2, w // factor // 2  # latents packed 2x2
    tokens = shapes.text_tokens[1]
    x = torch.randn(b, lh * lw, cfg.in_channels, dtype=dtype)
    pred = denoiser(
        hidden_states=x, encoder_hidden_states=torch.randn(b, tokens, cfg.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, dtype=dtype), timestep=torch.ones(b),
        img_ids=torch.zeros(lh * lw, 3), txt_ids=torch.zeros(tokens, 3),
        guidance=torch.ones(b) if cfg.guidance_embeds else None, return_dict=False)[0]
    return pred, torch.randn(pred.shape)

# ----------------------------------------------------------------- from a config, and the command
def settings_from_config(cfg, bucket: tuple[int, int], batch_size: int) -> RunSettings:
    """The settings of a configured run whose largest bucket is ``bucket`` (width, height)."""
    from trainer.setup import family_for

    t, n, flux = cfg.training, cfg.network, cfg.flux
    cached = t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk
    # where the trainer keeps the encoders during training (trainer.loop: a family that frees
    # them after caching, unless they are trained; [flux] offload_text_encoders: CPU memory)
    if flux.offload_text_encoders and family_for(cfg).name == "flux":
        encoders = "offloaded"
    elif cached and family_for(cfg).frees_text_encoders:
        encoders = "freed"
    else:
        encoders = "resident"
    return RunSettings(
        model=cfg.model.pretrained, config_dir=cfg.model.config_dir, mixed_precision=t.mixed_precision, fp8_base=cfg.model.fp8_base, network_type=n.type,
        rank=n.rank, alpha=n.alpha, mask=n.mask, targets=n.targets, train_text_encoder=n.train_text_encoder,
        optimizer=t.optimizer, optimizer_args=dict(t.optimizer_args), batch_size=batch_size, bucket=tuple(bucket),
        gradient_checkpointing=t.gradient_checkpointing, text_encoders=encoders, t5_tokens=flux.t5xxl_max_token_length)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.memory",
        description="Estimate the peak GPU memory of a training run from the model's real shapes (nothing is "
                    "loaded or allocated). With --config, the run of that config (as --dry-run prints it); "
                    "otherwise the run the options describe.")
    p.add_argument("--config", help="a training TOML; the options below are then ignored except --set")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--model", default="flux1-dev", help=f"{', '.join(MODELS)}, a diffusers folder or a single file")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--type", default="qrlora", choices=("qrlora", "lora"))
    p.add_argument("--targets", help="a preset or comma-separated patterns; default: the family's preset")
    p.add_argument("--resolution", type=int, default=1024, help="side of the largest (square) bucket")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--mixed-precision", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--fp8-base", action="store_true", help="FLUX: transformer stored in float8_e4m3fn")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "adamw8bit", "prodigy"))
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--text-encoders", default="resident", choices=tuple(_TE_PLACES),
                   help="resident on the GPU; freed (outputs cached, FLUX); offloaded (FLUX: kept in CPU memory)")
    p.add_argument("--attention", default="flash", choices=ATTENTION)
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON line")
    return p


def main(argv=None) -> int:
    from qrlora.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        if args.config:
            print(config_estimate(args.config, args.set).format())
            return 0
        targets = args.targets.split(",") if args.targets and "," in args.targets else args.targets
        s = RunSettings(model=args.model, mixed_precision=args.mixed_precision, fp8_base=args.fp8_base,
                        network_type=args.type, rank=args.rank, targets=targets, optimizer=args.optimizer,
                        batch_size=args.batch_size, bucket=(args.resolution, args.resolution),
                        gradient_checkpointing=not args.no_gradient_checkpointing,
                        text_encoders=args.text_encoders, attention=args.attention)
        e = estimate(s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(e.to_dict()) if args.json else e.format())
    return 0


def config_estimate(path: str, overrides: list[str]) -> MemoryEstimate:
    from trainer.config import load_config
    from trainer.data import TrainData

    cfg = load_config(path, overrides)
    plan = cfg.dataset_plan()
    return estimate(settings_from_config(cfg, *largest_bucket(plan, TrainData(plan, cfg.training.seed))))


def largest_bucket(plan, data) -> tuple[tuple[int, int], int]:
    """((width, height) of the largest bucket by area, the largest batch size): the step that
    needs the most memory (a bound when the two come from different datasets)."""
    buckets = [tuple(b) for b, _ in data.bucket_counts()] or [plan.datasets[0].buckets.resolution]
    return max(buckets, key=lambda b: (b[0] * b[1], b)), max(d.batch_size for d in plan.datasets)


if __name__ == "__main__":
    raise SystemExit(main())
