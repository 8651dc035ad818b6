"""The --dry-run peak-memory estimate (trainer/memory.py) against what the trainer allocates.

Weights: the estimate's figure is the byte count of the loaded tiny models' tensors. Adapters
and optimizer: the trainer's own network and optimizer are built on the loaded tiny models
and stepped once on the CPU, and their bytes are counted. Activations: only relations that
hold for any correct count (checkpointing keeps less, twice the batch keeps twice as much).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from trainer.memory import RunSettings, estimate

RANK = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes(*modules: torch.nn.Module) -> int:
    """Distinct parameter and buffer storages, as a device holds them."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _row(est, prefix: str) -> int:
    rows = [r for r in est.rows if r.component.startswith(prefix)]
    assert len(rows) == 1, [r.component for r in est.rows]
    return rows[0].bytes


@pytest.fixture(scope="module")
def loaded_sdxl():
    from trainer.families import get_family

    cfg = SimpleNamespace(pretrained="builtin:tiny-sdxl", config_dir=None, tokenizer=None, vae=None)
    return get_family("sdxl").load(cfg, "cpu", torch.bfloat16)


@pytest.fixture(scope="module")
def loaded_flux():
    from trainer.families.flux_load import load_flux

    cfg = SimpleNamespace(pretrained="builtin:tiny-flux")
    return {fp8: load_flux(cfg, "cpu", torch.bfloat16, fp8_base=fp8, needs_basis=False) for fp8 in (False, True)}


def test_weights_equal_the_loaded_tiny_sdxl(loaded_sdxl, single_threaded):
    est = estimate(RunSettings(model="builtin:tiny-sdxl", rank=RANK, bucket=(64, 64)))
    assert _row(est, "unet weights") == _bytes(loaded_sdxl.denoiser)
    assert _row(est, "vae weights") == _bytes(loaded_sdxl.vae)
    assert _row(est, "text encoder weights") == _bytes(*loaded_sdxl.text_encoders)


@pytest.mark.parametrize("fp8", [False, True])
def test_weights_equal_the_loaded_tiny_flux(loaded_flux, fp8, single_threaded):
    parts = loaded_flux[fp8]
    est = estimate(RunSettings(model="builtin:tiny-flux", rank=RANK, bucket=(64, 64), fp8_base=fp8))
    assert _row(est, "transformer weights") == _bytes(parts.transformer)
    assert _row(est, "vae weights") == _bytes(parts.vae)
    assert _row(est, "text encoder weights") == _bytes(parts.clip, parts.t5)


def test_fp8_base_halves_the_flux_transformer(single_threaded):
    """FLUX.1-dev's real shapes: every Linear weight goes from 2 bytes to 1; the rest (biases,
    norms) stays bf16, under 0.1 % of the bytes."""
    bf16 = estimate(RunSettings(model="flux1-dev", rank=RANK, bucket=(64, 64)))
    fp8 = estimate(RunSettings(model="flux1-dev", rank=RANK, bucket=(64, 64), fp8_base=True))
    ratio = _row(fp8, "transformer weights") / _row(bf16, "transformer weights")
    assert 0.5 <= ratio < 0.501
    assert "float8_e4m3fn" in [r.note for r in fp8.rows if r.component == "transformer weights"][0]
    assert _row(fp8, "adapters") == _row(bf16, "adapters")  # adapters stay float32


def test_cached_text_encoder_outputs_free_the_encoders(single_threaded):
    resident = estimate(RunSettings(model="builtin:tiny-flux", rank=RANK, bucket=(64, 64)))
    cached = estimate(RunSettings(model="builtin:tiny-flux", rank=RANK, bucket=(64, 64), text_encoders="freed"))
    assert _row(resident, "text encoder weights") > 0 and _row(cached, "text encoder weights") == 0
    assert resident.total - cached.total == _row(resident, "text encoder weights")


def _measured_adapter_state(modules: dict, optimizer: str, network_type: str = "qrlora") -> dict[str, int]:
    """What the trainer allocates for the adapters of ``modules``: its network (as make_network
    builds it) and optimizer (as make_optimization builds it), after one step on the CPU."""
    from trainer import setup

    cfg = SimpleNamespace(
        network=SimpleNamespace(type=network_type, rank=RANK, alpha=None, mask="triu", dropout=0.0, text_encoder_lr=None),
        training=SimpleNamespace(learning_rate=1e-4, optimizer=optimizer, optimizer_args={}, lr_scheduler="constant",
                                 lr_scheduler_num_cycles=1, warmup_steps=lambda total: 0))
    basis = SimpleNamespace(q={n: torch.linalg.qr(torch.randn(m.out_features, RANK))[0] for n, m in modules.items()})
    network = setup.make_network(cfg, modules, basis)
    optimizer, _ = setup.make_optimization(cfg, network, set(), 10)
    for p in network.trainable_parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"adapters": _bytes(network), "adapter gradients": sum(p.grad.nbytes for p in network.trainable_parameters()),
            "optimizer state": sum(t.nbytes for t in state)}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("network_type", ["qrlora", "lora"])
def test_adapter_and_optimizer_equal_the_trainers_tiny_sdxl(loaded_sdxl, optimizer, network_type, single_threaded):
    from trainer import setup
    from trainer.families import get_family

    cfg = SimpleNamespace(network=SimpleNamespace(targets=None, train_text_encoder=False))
    _, modules = setup.layer_modules(cfg, get_family("sdxl"), loaded_sdxl)
    measured = _measured_adapter_state(modules, optimizer, network_type)
    est = estimate(RunSettings(model="builtin:tiny-sdxl", rank=RANK, bucket=(64, 64), optimizer=optimizer,
                               network_type=network_type))
    assert est.targets == len(modules)
    assert {k: _row(est, k) for k in measured} == measured


def test_adapter_and_optimizer_equal_the_trainers_tiny_flux(loaded_flux, single_threaded):
    from qrlora import archs

    parts = loaded_flux[False]
    targets = archs.get("flux").select(parts.info["targets"], "flux-official")
    modules = {t.name: parts.transformer.get_submodule(t.name[len("transformer."):]) for t in targets}
    measured = _measured_adapter_state(modules, "adamw")
    est = estimate(RunSettings(model="builtin:tiny-flux", rank=RANK, bucket=(64, 64)))
    assert est.targets == len(modules)
    assert {k: _row(est, k) for k in measured} == measured


@pytest.mark.parametrize("model", ["builtin:tiny-sdxl", "builtin:tiny-flux"])
def test_activations_come_from_the_module_graph(model, single_threaded):
    one = estimate(RunSettings(model=model, rank=RANK, bucket=(128, 128), gradient_checkpointing=True))
    two = estimate(RunSettings(model=model, rank=RANK, bucket=(128, 128), batch_size=2))
    assert 0 < one.activations[True] < one.activations[False]  # checkpointing keeps less
    for ckpt in (True, False):  # nearly all saved tensors have a batch axis
        assert 1.8 * one.activations[ckpt] <= two.activations[ckpt] <= 2 * one.activations[ckpt]
    assert _row(one, "activations") == one.activations[True]
    math = estimate(RunSettings(model=model, rank=RANK, bucket=(128, 128), attention="math"))
    assert math.activations[False] > one.activations[False]  # the attention matrix is kept


def test_dry_run_prints_the_estimate(tmp_path, single_threaded):
    """The demo's dry run ends with the table and its total."""
    out = subprocess.run([sys.executable, "-m", "trainer", "--config", os.path.join(REPO, "examples", "demo.toml"),
                          "--dry-run", "--set", f"training.output_dir={tmp_path}", "--set", "training.mixed_precision=bf16",
                          "--set", "training.gradient_checkpointing=true"],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "peak GPU memory estimate: lab-base" in text and "bf16" in text  # LAB-DEMO: the demo trains on the lab base
    for row in ("unet weights", "text encoder weights", "adapter gradients", "optimizer state (adamw)",
                "activations (with gradient checkpointing)", "activations without gradient checkpointing would be",
                "total", "flash-style SDPA"):
        assert row in text, row


def test_memory_command_json(single_threaded):
    out = subprocess.run([sys.executable, "-m", "trainer.memory", "--model", "tiny-flux", "--resolution", "64",
                          "--rank", "4", "--fp8-base", "--text-encoders", "freed", "--json"],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["total_bytes"] == sum(r["bytes"] for r in report["rows"])
    assert "fp8 base" in report["description"] and "freed" in report["description"]



@pytest.mark.parametrize("example, overrides, place", [
    ("demo.toml", ["training.cache_text_encoder_outputs=true"], "resident"),  # the SDXL family keeps them
    ("flux-demo.toml", ["training.cache_text_encoder_outputs=true", "flux.offload_text_encoders=false"], "freed"),
    ("flux-demo.toml", ["training.cache_text_encoder_outputs=false", "flux.offload_text_encoders=false"], "resident"),
    ("flux-demo.toml", ["flux.offload_text_encoders=true"], "offloaded"),
])
def test_config_says_where_the_text_encoders_are(example, overrides, place, tmp_path):
    from trainer.config import load_config
    from trainer.memory import settings_from_config

    cfg = load_config(os.path.join(REPO, "examples", example), [f"training.output_dir={tmp_path}", *overrides])
    s = settings_from_config(cfg, (64, 64), 1)
    assert s.text_encoders == place
    assert s.fp8_base == cfg.model.fp8_base and s.t5_tokens == cfg.flux.t5xxl_max_token_length


def test_trained_text_encoders_stay_and_keep_activations(single_threaded):
    frozen = estimate(RunSettings(model="builtin:tiny-sdxl", rank=RANK, bucket=(64, 64), text_encoders="freed"))
    trained = estimate(RunSettings(model="builtin:tiny-sdxl", rank=RANK, bucket=(64, 64), text_encoders="freed",
                                   train_text_encoder=True))
    assert _row(frozen, "text encoder weights") == 0 < _row(trained, "text encoder weights")
    assert trained.targets > frozen.targets
    assert trained.activations[False] > frozen.activations[False]


def test_a_flux_single_file_is_read_off_its_shapes(tiny_flux, single_threaded):
    """A BFL file's transformer is sized as the FLUX loader sizes it (here from model.config_dir),
    not taken for FLUX.1-dev."""
    from_file = estimate(RunSettings(model=tiny_flux.checkpoint, config_dir=tiny_flux.config_dir, rank=RANK,
                                     bucket=(64, 64)))
    builtin = estimate(RunSettings(model="builtin:tiny-flux", rank=RANK, bucket=(64, 64)))
    assert _row(from_file, "transformer weights") == _row(builtin, "transformer weights")
    assert from_file.targets == builtin.targets
    assert _row(from_file, "adapters") == _row(builtin, "adapters")


def test_an_sdxl_single_file_with_a_config_dir_is_sized_by_it(tiny_sdxl, single_threaded):
    """A small SDXL-layout file (the tiny model, the lab base) with model.config_dir is sized as
    the SDXL loader loads it, not as SDXL base (which gave 13.5 GiB for a 1 M-parameter UNet)."""
    from_file = estimate(RunSettings(model=tiny_sdxl.checkpoint, config_dir=tiny_sdxl.config_dir, rank=RANK,
                                     bucket=(64, 64)))
    builtin = estimate(RunSettings(model="builtin:tiny-sdxl", rank=RANK, bucket=(64, 64)))
    assert _row(from_file, "unet weights") == _row(builtin, "unet weights")
    assert from_file.targets == builtin.targets
    assert _row(from_file, "adapters") == _row(builtin, "adapters")
