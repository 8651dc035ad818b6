"""Loading FLUX.1 from what its users have on disk. Nothing is downloaded.

Layouts (``load_flux``):
- a BFL single-file transformer (``flux1-dev.safetensors``; keys bare or under
  ``model.diffusion_model.``; bf16, fp16 or fp8) with separate ``ae.safetensors``,
  ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors``
  (config keys ``model.ae``, ``model.clip_l``, ``model.t5xxl``; kohya's ``ae``, ``clip_l``,
  ``t5xxl``);
- all-in-one files as ComfyUI and Forge save them: the transformer under
  ``model.diffusion_model.``, the AE under ``vae.``, CLIP-L under
  ``text_encoders.clip_l.transformer.``, T5-XXL under ``text_encoders.t5xxl.transformer.``
  (a component given by its own config key wins over the embedded one);
- a diffusers folder (``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
  ``tokenizer/``, ``tokenizer_2/``);
- ``builtin:tiny-flux`` (``qrlora.tiny.flux``, written once into the cache).

The BFL transformer is converted to diffusers' ``FluxTransformer2DModel`` driven by the
module's own keys through ``qrlora.archs.flux``'s table (the one statement of the fused-row
correspondence), so every file tensor is accounted for and a wrong key is an error. Modules
are built empty and filled with ``assign``, so no weight is held twice.

The QR-LoRA basis needs the 16-bit weights as stored: ``base_weight`` reads them from the
file (never from the loaded, possibly cast, module), and a transformer stored only in fp8
needs ``model.basis`` (a basis file, or the 16-bit file of the same model; see
``trainer.families.flux_basis``). ``fp8_base``
stores the frozen transformer's Linear weights as float8_e4m3fn and upcasts each one per
call to the input's dtype (kohya's fp8_base: storage-only fp8, computed in bf16). Tokenizers:
CLIP-L's as for SDXL, T5's from ``trainer.families.flux_tokenizers``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qrlora.archs.flux import Flux, checkpoint_prefix, diffusers_to_bfl
from qrlora.checkpoint import FileFormatError, SafetensorsFile, read_header
from qrlora.errors import UserError


from . import BUILTIN_PREFIX, cache_root
from . import sdxl_load as L

TINY = "tiny-flux"
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_AE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
)
# T5 v1.1 settings the shapes do not show (google/t5-v1_1-xxl config.json)
T5_V1_1 = dict(feed_forward_proj="gated-gelu", relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
               is_encoder_decoder=False, tie_word_embeddings=False, use_cache=False, dropout_rate=0.0)
# FLUX.1's rotary axes (16 + 56 + 56 = its 128-wide heads); not visible in any weight shape.
FLUX_ROPE_AXES = (16, 56, 56)
# Keys released CLIP-L files carry that CLIPTextModel has no place for.
CLIP_IGNORED = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")
OPTION = {"vae": "model.ae", "clip": "model.clip_l", "t5": "model.t5xxl"}
WHAT = {"vae": "the FLUX autoencoder (ae.safetensors)", "clip": "the CLIP-L text encoder (clip_l.safetensors)",
        "t5": "the T5-XXL text encoder (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)"}


@dataclass
class FluxParts:
    """A loaded FLUX.1, frozen, on its device."""

    transformer: torch.nn.Module  # diffusers FluxTransformer2DModel
    vae: torch.nn.Module  # AutoencoderKL, 16 latent channels; config.scaling_factor / shift_factor
    clip: torch.nn.Module  # transformers CLIPTextModel
    t5: torch.nn.Module  # transformers T5EncoderModel
    clip_tokenizer: Any
    t5_tokenizer: Any
    basis_source: str | None  # a 16-bit BFL single file the basis is computed from, else None
    base_weight: Callable[[str], torch.Tensor | None]  # layer name -> 16-bit weight as stored (rows sliced), or None
    identity: str  # content identity of every weight file
    is_schnell: bool  # no guidance embedding
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    """Where one component's tensors are: a file and a key prefix, or a diffusers folder."""

    path: str
    prefix: str = ""
    folder: bool = False
    option: str = "model.pretrained"


# ----------------------------------------------------------------- finding the parts
def _opt(model_cfg, name: str) -> str | None:
    return getattr(model_cfg, name, None) or None


def tiny_model() -> tuple[str, str, dict[str, str]]:
    """(transformer file, config dir, {vae, clip_l, t5}) of the built-in tiny FLUX, written once
    into the cache (renamed into place whole, so other ranks see all of it or nothing)."""
    import shutil
    import tempfile

    from qrlora.tiny import make_tiny
    from qrlora.tiny.flux import CHECKPOINT, CLIP_FILE, T5_FILE, VAE_FILE

    folder = cache_root("tiny", "flux-seed0")
    done = os.path.join(folder, "config", "text_encoder_2", "config.json")
    if not os.path.isfile(done):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-")
        try:
            make_tiny("flux", tmp, seed=0)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not os.path.isfile(done):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    files = {"vae": VAE_FILE, "clip_l": CLIP_FILE, "t5": T5_FILE}
    return os.path.join(folder, CHECKPOINT), os.path.join(folder, "config"), {k: os.path.join(folder, v) for k, v in files.items()}


def is_diffusers_flux(folder: str) -> bool:
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            if "Flux" in str(json.load(f).get("_class_name", "")):
                return True
    config = os.path.join(folder, "transformer", "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return "Flux" in str(json.load(f).get("_class_name", ""))
    return False


def _locate(model_cfg) -> tuple[dict[str, _Source], str, str | None, bool]:
    """({transformer, vae, clip, t5} -> source, layout, config_dir, builtin); every missing
    part in one message naming its config key."""
    pretrained = model_cfg.pretrained
    config_dir = _opt(model_cfg, "config_dir")
    given = {"vae": _opt(model_cfg, "ae"), "clip": _opt(model_cfg, "clip_l"), "t5": _opt(model_cfg, "t5xxl")}
    builtin = pretrained.startswith(BUILTIN_PREFIX)
    sources: dict[str, _Source] = {}
    if builtin:
        if pretrained != BUILTIN_PREFIX + TINY:
            raise UserError(f"model.pretrained: unknown built-in FLUX model {pretrained!r}; built-in: "
                              f"{BUILTIN_PREFIX + TINY}")
        checkpoint, tiny_configs, extra = tiny_model()
        config_dir = config_dir or tiny_configs
        sources["transformer"] = _Source(checkpoint)
        defaults = {"vae": extra["vae"], "clip": extra["clip_l"], "t5": extra["t5"]}
        layout = "builtin:tiny-flux"
    elif os.path.isdir(pretrained):
        if not is_diffusers_flux(pretrained):
            raise FileFormatError(f"model.pretrained: {pretrained} is not a diffusers FLUX folder "
                                  "(no transformer/config.json of a FluxTransformer2DModel)")
        parts = {"transformer": "transformer", "vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}
        subs = {k: os.path.join(pretrained, v) for k, v in parts.items()}
        sources["transformer"] = _Source(subs["transformer"], folder=True)
        defaults = {k: subs[k] for k in ("vae", "clip", "t5") if os.path.isdir(subs[k])}
        layout = "diffusers folder"
    else:
        if not os.path.isfile(pretrained):
            raise FileFormatError(f"model.pretrained: {pretrained} does not exist")
        keys = read_header(pretrained)[0].keys()
        prefix = checkpoint_prefix(keys)
        if prefix is None:
            raise FileFormatError(f"model.pretrained: {pretrained} holds no FLUX.1 transformer "
                                  "(no double_blocks.0.img_attn.qkv.weight, bare or under model.diffusion_model.)")
        sources["transformer"] = _Source(pretrained, prefix)
        defaults = {}
        vae_prefix = next((p for p in VAE_PREFIXES if f"{p}encoder.conv_in.weight" in keys), None)
        if vae_prefix:
            defaults["vae"] = (pretrained, vae_prefix)
        if f"{CLIP_PREFIX}text_model.final_layer_norm.weight" in keys:
            defaults["clip"] = (pretrained, CLIP_PREFIX)
        if f"{T5_PREFIX}encoder.final_layer_norm.weight" in keys:
            defaults["t5"] = (pretrained, T5_PREFIX)
        layout = "all-in-one file" if defaults else "single file"

    problems = []
    for part in ("vae", "clip", "t5"):
        path = given[part]
        if path:
            if not os.path.exists(path):
                problems.append(f"{OPTION[part]}: {path} does not exist")
                continue
            sources[part] = _Source(path, folder=os.path.isdir(path), option=OPTION[part])
        elif part in defaults:
            d = defaults[part]
            sources[part] = _Source(*d) if isinstance(d, tuple) else _Source(d, folder=os.path.isdir(d))
        else:
            problems.append(f"{OPTION[part]}: {WHAT[part]} is needed and {pretrained} does not hold it; set "
                            f"{OPTION[part]} (kohya: {OPTION[part].split('.')[1]}) to its file")
    if problems:
        raise UserError("; ".join(problems))
    return sources, layout, config_dir, builtin


def check_files(model_cfg, *, needs_basis: bool = True, rank: int | None = None, targets=None) -> None:
    """What ``load_flux`` settles before reading any weight, from the files' headers alone, for
    the trainer's preflight and ``--dry-run``: every part found, the basis of an fp8 transformer."""
    from .flux_basis import resolve_basis

    sources = _locate(model_cfg)[0]
    resolve_basis(model_cfg, sources["transformer"], rank, needs_basis, targets)


# ----------------------------------------------------------------- reading tensors
class _Reader:
    """Tensors of one file under one prefix, keys without the prefix."""

    def __init__(self, source: _Source):
        self.source = source
        self.ckpt = SafetensorsFile(source.path)
        self.keys = [k[len(source.prefix):] for k in self.ckpt.keys if k.startswith(source.prefix)]

    def __contains__(self, key: str) -> bool:
        return self.source.prefix + key in self.ckpt.header

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.ckpt.shape(self.source.prefix + k) for k in self.keys}

    def tensor(self, key: str) -> torch.Tensor:
        return self.ckpt.tensor(self.source.prefix + key)


# ----------------------------------------------------------------- configs
def _config_json(config_dir: str | None, component: str) -> str | None:
    if not config_dir:
        return None
    path = os.path.join(config_dir, component)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def transformer_config(shapes: dict[str, tuple[int, ...]], config_dir: str | None, where: str) -> dict:
    """The diffusers config: ``config_dir/transformer`` if given, else read off the BFL shapes."""
    from diffusers import FluxTransformer2DModel

    folder = _config_json(config_dir, "transformer")
    if folder:
        return dict(FluxTransformer2DModel.load_config(folder))

    def count(kind: str) -> int:
        return len({m.group(1) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))})

    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != sum(FLUX_ROPE_AXES):
        raise UserError(f"{where}: attention heads {head_dim} wide, FLUX.1's are {sum(FLUX_ROPE_AXES)}; set "
                          "model.config_dir to a folder with transformer/config.json describing this model")
    return dict(
        patch_size=1, in_channels=in_channels, num_layers=count("double_blocks"),
        num_single_layers=count("single_blocks"), attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1], pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes, axes_dims_rope=FLUX_ROPE_AXES,
    )


def t5_config(shapes: dict[str, tuple[int, ...]], config_dir: str | None):
    """``config_dir/text_encoder_2`` if given, else T5 v1.1 with the sizes the shapes show."""
    from transformers import T5Config

    folder = _config_json(config_dir, "text_encoder_2")
    if folder:
        return T5Config.from_pretrained(folder, local_files_only=True)
    embed = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    layers = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    return T5Config(vocab_size=embed[0], d_model=embed[1], d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                    d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], num_layers=layers,
                    num_heads=heads, relative_attention_num_buckets=buckets, **T5_V1_1)


def clip_config(config_dir: str | None):
    from transformers import CLIPTextConfig

    from qrlora.tiny.real import CLIP_L

    folder = _config_json(config_dir, "text_encoder")
    if folder:
        return CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    return CLIPTextConfig(**CLIP_L)


def vae_config(config_dir: str | None) -> dict:
    from diffusers import AutoencoderKL

    folder = _config_json(config_dir, "vae")
    return dict(AutoencoderKL.load_config(folder)) if folder else dict(FLUX_AE)


# ----------------------------------------------------------------- the transformer
def bfl_row_map(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, slice | torch.Tensor]]:
    """diffusers key -> (BFL key, rows of the BFL tensor it is, in its order), for a transformer
    with these diffusers shapes.

    Read off ``qrlora.archs.flux.diffusers_to_bfl`` itself (the one statement of the layout
    correspondence) by converting tagged rows: row ``i`` of the ``n``-th diffusers tensor holds
    ``n * 2**32 + i`` (exact in float64), so wherever the converter puts it (fused row blocks,
    the final layer's swapped halves), its origin can be read back.
    """
    keys = list(shapes)
    tagged = {k: (n * 2.0**32 + torch.arange(shapes[k][0] if shapes[k] else 1, dtype=torch.float64))
              for n, k in enumerate(keys)}
    out: dict[str, tuple[str, slice | torch.Tensor]] = {}
    for bfl_key, codes in diffusers_to_bfl(tagged).items():
        owner = torch.div(codes, 2.0**32, rounding_mode="floor").long()
        for n in owner.unique().tolist():
            positions = (owner == n).nonzero().flatten()
            order = (codes[positions] - n * 2.0**32).long()
            rows = positions[order.argsort()]  # BFL row of diffusers row 0, 1, ...
            start = int(rows[0])
            contiguous = bool((rows == torch.arange(start, start + len(rows))).all())
            out[keys[n]] = (bfl_key, slice(start, start + len(rows)) if contiguous else rows)
    return out


def transformer_from_bfl(reader: _Reader, module: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """BFL tensors -> the module's diffusers keys (fused q/k/v and linear1 rows sliced as views,
    RMSNorm ``scale`` renamed, the final layer's halves swapped back); every file tensor must
    find its place, and a missing one is reported by the strict fill."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    row_map = bfl_row_map(shapes)
    out, used, cache = {}, set(), {}
    for key, (bfl_key, rows) in row_map.items():
        if bfl_key not in reader:
            continue
        used.add(bfl_key)
        if bfl_key not in cache:
            cache[bfl_key] = reader.tensor(bfl_key)
        tensor = cache[bfl_key]
        out[key] = tensor.reshape(shapes[key]) if not shapes[key] else tensor[rows]
    extra = [k for k in reader.keys if k not in used]
    if extra:
        raise ValueError(f"{what}: transformer keys with no place in the model: {L._few(extra)}")
    return out


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in float8 and upcast to the input's dtype on
    every call (the class of a loaded ``nn.Linear`` is swapped to this, so adapters that wrap
    its ``forward`` and ``isinstance(m, nn.Linear)`` checks see an ordinary Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _linear_weight_keys(module: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def fill_transformer(module, state_dict: dict, what: str, dtype, device, fp8_base: bool):
    """Strict fill; with ``fp8_base`` the Linear weights are stored float8_e4m3fn (each cast on
    its own, so a 16-bit copy of the whole model is never held) and their class swapped."""
    linear = _linear_weight_keys(module) if fp8_base else set()
    sd = {k: v.to(device, torch.float8_e4m3fn if k in linear else dtype) for k, v in state_dict.items()}
    result = module.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: weights do not fit the model config: missing {L._few(result.missing_keys)}, "
                         f"unexpected {L._few(result.unexpected_keys)}")
    for name, p in module.named_parameters():
        if p.is_meta:
            raise ValueError(f"{what}: parameter {name} was not loaded")
    module.to(device)  # buffers the file does not hold
    if fp8_base:
        for m in module.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = Fp8Linear
    return module.requires_grad_(False).eval()


def _empty_transformer(config: dict):
    from diffusers import FluxTransformer2DModel

    with L._empty():
        return FluxTransformer2DModel.from_config(config)


def load_transformer(source: _Source, config_dir: str | None, device, dtype, fp8_base: bool):
    """(FluxTransformer2DModel, targets) from a BFL file (any prefix) or a diffusers folder."""
    what = f"{source.option} {source.path}"
    if source.folder:
        from diffusers import FluxTransformer2DModel

        module = _empty_transformer(dict(FluxTransformer2DModel.load_config(source.path)))
        state = {}
        for path in L.component_weight_files(source.path):
            ckpt = SafetensorsFile(path)
            state.update({k: ckpt.tensor(k) for k in ckpt.keys})
        if not state:
            raise FileFormatError(f"{what}: no .safetensors weights (diffusion_pytorch_model.safetensors)")
        fill_transformer(module, state, what, dtype, device, fp8_base)
        meta = {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(meta).items()}
        return module, Flux().linear_targets(shapes)
    reader = _Reader(source)
    shapes = reader.shapes()
    module = _empty_transformer(transformer_config(shapes, config_dir, what))
    fill_transformer(module, transformer_from_bfl(reader, module, what), what, dtype, device, fp8_base)
    return module, Flux().linear_targets(reader.ckpt.shapes())


def _component_tensors(source: _Source, ignored=()) -> dict[str, torch.Tensor]:
    """A component's tensors from its file, prefix removed; ComfyUI's scaled fp8 files
    (``<layer>.scale_weight`` beside an fp8 weight) are multiplied out."""
    reader = _Reader(source)
    keys = [k for k in reader.keys if k not in ignored and k != "scaled_fp8"]
    out = {k: reader.tensor(k) for k in keys if not k.endswith(".scale_weight")}
    for key in keys:
        if key.endswith(".scale_weight"):
            weight = key[: -len("scale_weight")] + "weight"
            out[weight] = out[weight].float() * reader.tensor(key).float()
    reader.ckpt.close()
    return out


def _from_folder(cls, path: str, device, dtype):
    return cls.from_pretrained(path, local_files_only=True).to(device, dtype).requires_grad_(False).eval()


def load_vae(source: _Source, config_dir: str | None, device, dtype):
    from diffusers import AutoencoderKL

    what = f"{source.option} {source.path}"
    if source.folder:
        return _from_folder(AutoencoderKL, source.path, device, dtype)
    config = vae_config(config_dir)
    tensors = _component_tensors(source)
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        tensors = L.vae_from_ldm(tensors, config)
    with L._empty():
        vae = AutoencoderKL.from_config(config)
    return L.fill(vae, tensors, what, dtype, device)


def load_clip(source: _Source, config_dir: str | None, device, dtype):
    from transformers import CLIPTextModel

    if source.folder:
        return _from_folder(CLIPTextModel, source.path, device, dtype)
    with L._empty():
        module = CLIPTextModel(clip_config(config_dir))
    tensors = L.fit_text_model_prefix(_component_tensors(source, CLIP_IGNORED), module)
    return L.fill(module, tensors, f"{source.option} {source.path}", dtype, device)


def load_t5(source: _Source, config_dir: str | None, device, dtype):
    from transformers import T5EncoderModel

    if source.folder:
        return _from_folder(T5EncoderModel, source.path, device, dtype)
    tensors = _component_tensors(source)
    # Released T5 files store the token embedding once; the model ties two names to it.
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in tensors and b not in tensors:
            tensors[b] = tensors[a]
    with L._empty():
        module = T5EncoderModel(t5_config({k: tuple(v.shape) for k, v in tensors.items()}, config_dir))
    return L.fill(module, tensors, f"{source.option} {source.path}", dtype, device)


# ----------------------------------------------------------------- the whole model
def load_flux(model_cfg, device, weight_dtype: torch.dtype, *, fp8_base: bool = False,
              needs_basis: bool = True, rank: int | None = None, targets=None) -> FluxParts:
    """Load FLUX.1 from ``model_cfg`` (``pretrained``, ``ae``, ``clip_l``, ``t5xxl``,
    ``config_dir``, ``tokenizer``, ``t5_tokenizer``, ``basis``). Every file is found and the
    basis question settled before any weight is read. ``needs_basis``: stop when the weights
    are fp8 only and no ``model.basis`` is given; ``rank`` and ``targets`` go into that message's command."""
    from ..cache import weights_identity
    from ..tokenizers import EOS, resolve_clip_tokenizers
    from .flux_basis import resolve_basis
    from .flux_tokenizers import load_t5_tokenizer

    device = torch.device(device)
    fp8_base = bool(fp8_base or getattr(model_cfg, "fp8_base", False))
    sources, layout, config_dir, builtin = _locate(model_cfg)
    basis_source, base_weight, basis_file, stored, command = resolve_basis(model_cfg, sources["transformer"], rank,
                                                                            needs_basis, targets)
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype

    transformer, targets = load_transformer(sources["transformer"], config_dir, device, weight_dtype, fp8_base)
    vae = load_vae(sources["vae"], config_dir, device, vae_dtype)
    clip = load_clip(sources["clip"], config_dir, device, weight_dtype)
    t5 = load_t5(sources["t5"], config_dir, device, weight_dtype)

    model_dir = model_cfg.pretrained if layout == "diffusers folder" else None
    (clip_tokenizer,), clip_choice = resolve_clip_tokenizers(
        (EOS,), _opt(model_cfg, "tokenizer"), model_dir, cache_root("tokenizers"), builtin_tiny=builtin,
        subfolders=("tokenizer",),
    )
    t5_tokenizer, t5_choice = load_t5_tokenizer(_opt(model_cfg, "t5_tokenizer"), model_dir, builtin)

    files: list[str] = []
    for src in sources.values():
        for path in (L.component_weight_files(src.path) if src.folder else [src.path]):
            if path not in files:
                files.append(path)
    return FluxParts(
        transformer=transformer, vae=vae, clip=clip, t5=t5, clip_tokenizer=clip_tokenizer, t5_tokenizer=t5_tokenizer,
        basis_source=basis_source, base_weight=base_weight, identity=f"flux-{weights_identity(files)}",
        is_schnell=not transformer.config.guidance_embeds,
        info={
            "layout": layout, "files": {k: (s.path, s.prefix) for k, s in sources.items()}, "targets": targets,
            "basis_file": basis_file, "weight_storage": sorted(stored), "basis_command": command,
            "fp8_base": fp8_base, "vae_dtype": vae_dtype, "tokenizer": clip_choice,
            "tokenizer_source": f"CLIP: {clip_choice}; T5: {t5_choice}",
        },
    )
