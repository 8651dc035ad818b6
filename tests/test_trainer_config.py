"""The training config: sections, defaults, --set overrides, and the error messages."""

import json
import os

import pytest
from PIL import Image

from trainer.config import load_config
from trainer.schema import ConfigError, Context, Float, Int, Schema, Field, Bool, describe

DATASET = """
[[datasets]]
resolution = [512, 384]
  [[datasets.subsets]]
  image_dir = "imgs"
  class_tokens = "sks dog"
"""
MINIMAL = """
[model]
pretrained = "builtin:tiny-sdxl"
[training]
output_dir = "out"
""" + DATASET


@pytest.fixture
def root(tmp_path):
    os.makedirs(tmp_path / "imgs")
    for n in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / n)
    return tmp_path


def cfg_file(root, text, name="dog.toml"):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems(root, text, overrides=(), **kw):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file(root, text), overrides, **kw)
    return e.value.problems


def test_defaults(root):
    c = load_config(cfg_file(root, MINIMAL))
    assert c.source == str(root / "dog.toml")
    assert c.model.__dict__ == dict(pretrained="builtin:tiny-sdxl", family="sdxl", config_dir=None, tokenizer=None,
                                    vae=None, prediction_type=None, ae=None, clip_l=None, t5xxl=None, t5_tokenizer=None,
                                    basis=None,
                                    fp8_base=False)  # FLUX files (H1a)
    assert c.network.__dict__ == dict(type="qrlora", rank=16, alpha=16.0, mask="triu", targets=None,
                                      train_text_encoder=False, text_encoder_lr=None, basis_cache=None, dropout=0.0)
    assert c.training.__dict__ == dict(
        output_dir=str(root / "out"), output_name="dog", seed=42, max_train_steps=1600, max_train_epochs=None,
        learning_rate=1e-4, optimizer="adamw", optimizer_args={}, lr_scheduler="constant", lr_warmup_steps=0,
        lr_scheduler_num_cycles=1, mixed_precision="no", gradient_checkpointing=False, gradient_accumulation_steps=1,
        max_grad_norm=1.0, noise_offset=0.0, min_snr_gamma=None, prior_loss_weight=1.0, cache_latents=False,
        cache_latents_to_disk=False, cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=False,
        max_data_loader_n_workers=0, device="auto", cpu_threads=0)
    assert c.sampling.__dict__ == dict(prompts=None, sample_every_n_steps=None, sample_every_n_epochs=None,
                                       sample_at_first=False, sample_sampler="euler_a", steps=20, guidance_scale=7.0,
                                       width=512, height=384,  # the dataset's resolution
                                       scorer=None)  # LAB-DEMO: sampling.scorer
    s = c.saving
    assert (s.save_every_n_steps, s.save_every_n_epochs, s.save_last_n, s.save_precision, s.save_state, s.resume,
            s.embed_basis) == (None, None, None, "fp16", True, None, False)
    assert s.metadata.__dict__ == dict(title=None, author=None, description=None, license=None, tags=None,
                                       trigger_phrase=None)
    assert c.logging.__dict__ == dict(logging_dir=None, log_with="none", log_prefix=None)
    assert c.warnings == ()
    plan = c.dataset_plan()
    assert [i.caption for i in plan.datasets[0].items] == ["sks dog", "sks dog"]


FULL = """
dataset_config = "data/ds.toml"

[model]
pretrained = "models/base.safetensors"
family = "sdxl"
config_dir = "models/cfg"
tokenizer = "~/tok"
vae = "/abs/vae.safetensors"

[network]
type = "lora"
rank = 32
alpha = 8
mask = "none"
targets = "attn-mlp"
train_text_encoder = true
text_encoder_lr = 5e-5
basis_cache = "cache"
dropout = 0.1

[training]
output_dir = "/tmp/qr-out"
output_name = "my_dog"
seed = 7
max_train_steps = 100
max_train_epochs = 3
learning_rate = 1
optimizer = "Prodigy"
optimizer_args = { weight_decay = 0.01, betas = [0.9, 0.99], decouple = true }
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0.1
lr_scheduler_num_cycles = 3
mixed_precision = "bf16"
gradient_checkpointing = true
gradient_accumulation_steps = 4
max_grad_norm = 0
noise_offset = 0.0357
min_snr_gamma = 5
prior_loss_weight = 0.5
cache_latents_to_disk = true
cache_text_encoder_outputs = false
max_data_loader_n_workers = 2
device = "cuda:1"

[sampling]
prompts = ["a sks dog --w 640 --h 640 --d 1", "a cat --n blurry"]
sample_every_n_steps = 50
sample_every_n_epochs = 1
sample_at_first = true
sample_sampler = "ddim"
steps = 30
guidance_scale = 5
width = 768

[saving]
save_every_n_steps = 25
save_every_n_epochs = 1
save_last_n = 3
save_precision = "bf16"
save_state = false
resume = "out/state"
embed_basis = true
metadata = { title = "Dog", author = "me", description = "d", license = "MIT", tags = ["dog", "sks"], trigger_phrase = "sks dog" }

[logging]
logging_dir = "logs"
log_prefix = "run1"
"""


def test_every_section(root):
    cfg_file(root, "[[datasets]]\nresolution = 640\n[[datasets.subsets]]\nimage_dir = '../imgs'\n", "data/ds.toml")
    c = load_config(cfg_file(root, FULL), check_paths=False)
    assert c.model.pretrained == str(root / "models/base.safetensors")
    assert c.model.tokenizer == os.path.expanduser("~/tok") and c.model.vae == "/abs/vae.safetensors"
    n = c.network
    assert (n.type, n.rank, n.alpha, n.mask, n.targets, n.train_text_encoder, n.text_encoder_lr, n.dropout) == (
        "lora", 32, 8.0, "none", "attn-mlp", True, 5e-5, 0.1)
    assert n.basis_cache == str(root / "cache")
    t = c.training
    assert (t.output_dir, t.output_name, t.seed, t.max_train_steps, t.max_train_epochs) == (
        "/tmp/qr-out", "my_dog", 7, 100, 3)
    assert (t.learning_rate, t.optimizer, t.lr_scheduler, t.lr_scheduler_num_cycles) == (
        1.0, "prodigy", "cosine_with_restarts", 3)
    assert t.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True}
    assert t.lr_warmup_steps == 0.1 and t.warmup_steps(1000) == 100
    assert (t.mixed_precision, t.gradient_checkpointing, t.gradient_accumulation_steps, t.max_grad_norm) == (
        "bf16", True, 4, 0.0)
    assert (t.noise_offset, t.min_snr_gamma, t.prior_loss_weight) == (0.0357, 5.0, 0.5)
    assert (t.cache_latents, t.cache_latents_to_disk, t.cache_text_encoder_outputs) == (True, True, False)
    assert (t.max_data_loader_n_workers, t.device) == (2, "cuda:1")
    smp = c.sampling
    assert smp.prompts == ["a sks dog --w 640 --h 640 --d 1", "a cat --n blurry"]
    assert (smp.sample_every_n_steps, smp.sample_every_n_epochs, smp.sample_at_first, smp.sample_sampler) == (
        50, 1, True, "ddim")
    assert (smp.steps, smp.guidance_scale, smp.width, smp.height) == (30, 5.0, 768, 640)
    s = c.saving
    assert (s.save_every_n_steps, s.save_every_n_epochs, s.save_last_n, s.save_precision, s.save_state) == (
        25, 1, 3, "bf16", False)
    assert s.resume == str(root / "out/state") and s.embed_basis
    assert s.metadata.tags == "dog, sks" and s.metadata.trigger_phrase == "sks dog" and s.metadata.license == "MIT"
    assert (c.logging.logging_dir, c.logging.log_with, c.logging.log_prefix) == (str(root / "logs"), "tensorboard",
                                                                                 "run1")
    assert c.dataset.file == str(root / "data/ds.toml")
    # the dataset file's relative image_dir resolves against the dataset file's folder
    assert c.dataset.datasets[0].subsets[0].options["image_dir"] == str(root / "imgs")
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["dataset"]["datasets"][0]["resolution"] == [640, 640] and d["training"]["optimizer"] == "prodigy"
    assert c.warnings == ()  # text_encoder_lr is used; prodigy with lr 1


def test_overrides(root):
    path = cfg_file(root, MINIMAL)
    c = load_config(path, [
        "training.learning_rate=5e-5", 'network.targets=["unet.*attn1*"]', "training.output_dir=/tmp/x",
        "training.output_name=2024", "model.family=sdxl", "training.gradient_checkpointing=true",
        "sampling.width=640", "datasets.0.subsets.0.num_repeats=3", "general.flip_aug=true",
        "training.optimizer_args.weight_decay=0.1", "saving.metadata.title = My Dog",
    ])
    assert c.training.learning_rate == 5e-5 and c.network.targets == ["unet.*attn1*"]
    assert c.training.output_dir == "/tmp/x" and c.training.output_name == "2024"
    assert c.training.gradient_checkpointing and c.sampling.width == 640
    assert c.training.optimizer_args == {"weight_decay": 0.1} and c.saving.metadata.title == "My Dog"
    items = c.dataset_plan().datasets[0].items
    assert {(i.repeats, i.augment.flip_aug) for i in items} == {(3, True)}


def test_override_errors(root):
    path = cfg_file(root, MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["training.lerning_rate=1", "training.seed=abc", "traning.seed=1", "network",
                           "datasets.3.resolution=5", "training.seed.x=1", "network.rank=true"])
    assert e.value.problems == [
        "--set 'network': expected section.key=value",
        "--set training.seed.x: training.seed is not a table",
        "unknown key 'traning' at the top level; did you mean 'training'?",
        "network.rank: expected an integer >= 1, got true",
        "unknown key 'lerning_rate' in training; did you mean 'learning_rate'?",
        "training.seed: expected an integer >= 0, got 'abc'",
        "--set datasets.3.resolution: datasets has 1 entries, so '3' is not a valid index",
    ]


def test_typos_and_misplaced_keys(root):
    text = "lerning_rate = 1\n" + MINIMAL.replace("[training]", """
[network]
network_dim = 8
learning_rate = 1e-4
rnak = 4
[saving]
save_every_n_step = 10
metadata = { titel = "x" }
[sampels]
[logging]
sample_every_n_step = 1
[training]
batch_size = 2""")
    assert problems(root, text) == [
        "unknown key 'lerning_rate' at the top level; did you mean 'learning_rate'? ('learning_rate' belongs in"
        " [training])",
        "unknown key 'sampels' at the top level; did you mean 'sampling'?",
        "network.network_dim: is kohya's name; here it is network.rank",
        "network.learning_rate: belongs in [training]",
        "unknown key 'rnak' in network; did you mean 'rank'?",
        "training.batch_size: is a dataset option: set it in [general] or a [[datasets]] entry",
        "unknown key 'save_every_n_step' in saving; did you mean 'save_every_n_steps'?",
        "unknown key 'titel' in saving.metadata; did you mean 'title'?",
        "unknown key 'sample_every_n_step' in logging; did you mean 'sample_every_n_steps'? ('sample_every_n_steps'"
        " belongs in [sampling])",
    ]


def test_wrong_types(root):
    text = MINIMAL + """
[network]
rank = 8.0
alpha = "four"
train_text_encoder = 1
dropout = 1.5
[saving]
save_state = "yes"
save_precision = "fp8"
[sampling]
prompts = 3
guidance_scale = 7
[logging]
log_with = "wandb"
"""
    text = text.replace('output_dir = "out"', 'output_dir = "out"\nseed = true\nlr_scheduler = "cosine_restarts"'
                        '\nmax_grad_norm = "1"\nnoise_offset = 0')
    assert problems(root, text) == [
        "network.rank: expected an integer >= 1, got 8.0",
        "network.alpha: expected a number > 0, got 'four'",
        "network.train_text_encoder: expected true or false, got 1",
        "network.dropout: expected a number >= 0 and < 1, got 1.5",
        "training.seed: expected an integer >= 0, got true",
        "training.lr_scheduler: expected one of 'constant', 'constant_with_warmup', 'linear', 'cosine',"
        " 'cosine_with_restarts', got 'cosine_restarts'; did you mean 'cosine_with_restarts'?",
        "training.max_grad_norm: expected a number >= 0, got '1'",
        "sampling.prompts: expected a string or a list of strings, got 3",
        "saving.save_state: expected true or false, got 'yes'",
        "saving.save_precision: expected one of 'fp16', 'bf16', 'fp32', got 'fp8'",
        "logging.log_with: expected one of 'tensorboard', 'none', got 'wandb'",
    ]


def test_missing_required(root):
    assert problems(root, "[model]\n[training]\n" + DATASET) == [
        "model.pretrained is required", "training.output_dir is required"]
    assert problems(root, DATASET) == ["model.pretrained is required", "training.output_dir is required"]


def test_dataset_forms(root):
    cfg_file(root, DATASET, "ds.toml")
    head = MINIMAL.replace(DATASET, "")
    assert problems(root, 'dataset_config = "ds.toml"\n' + MINIMAL) == [
        "dataset_config and inline [general]/[[datasets]] tables are both given; use one"]
    assert problems(root, head) == [
        'no dataset: add [[datasets]] with [[datasets.subsets]] tables, dataset_config = "path/to/kohya_dataset.toml",'
        ' or kohya\'s train_data_dir = "folder of \'10_sks dog\' sub-folders"']
    c = load_config(cfg_file(root, 'dataset_config = "ds.toml"\n' + head), ["general.num_repeats=2"])
    assert {i.repeats for i in c.dataset_plan().datasets[0].items} == {2}
    missing = problems(root, 'dataset_config = "nope.toml"\n' + head)
    assert missing == [f"dataset_config: file not found: {root / 'nope.toml'}"]
    cfg_file(root, DATASET.replace("class_tokens", "class_token"), "bad.toml")
    assert problems(root, 'dataset_config = "bad.toml"\n' + head) == [
        f"{root / 'bad.toml'}: unknown key 'class_token' in datasets[0].subsets[0]; did you mean 'class_tokens'?"]


def test_toml_syntax_errors(root):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file(root, MINIMAL.replace('output_dir = "out"', "output_dir = out")))
    assert str(e.value).startswith(f"{root / 'dog.toml'}: line 5, column ")
    assert "invalid TOML" in str(e.value)
    cfg_file(root, "[[datasets]]\nresolution = 512\n[[datasets.subsets]\n", "ds.toml")
    msg = "\n".join(problems(root, 'dataset_config = "ds.toml"\n' + MINIMAL.replace(DATASET, "")))
    assert f"{root / 'ds.toml'}: line 3, column" in msg


def test_relative_paths(root):
    os.makedirs(root / "cfg")
    (root / "cfg" / "prompts.txt").write_text("a dog\n")
    text = MINIMAL.replace('"imgs"', '"../imgs"') + '[sampling]\nprompts = "prompts.txt"\nsample_at_first = true\n'
    c = load_config(cfg_file(root, text, "cfg/dog.toml"))
    assert c.training.output_dir == str(root / "cfg" / "out")
    assert c.sampling.prompts == str(root / "cfg" / "prompts.txt")
    assert c.dataset.datasets[0].subsets[0].options["image_dir"] == str(root / "imgs")
    assert len(c.dataset_plan().datasets[0].items) == 2


def test_cross_checks(root):
    text = MINIMAL.replace("[training]", """
[network]
train_text_encoder = true
[sampling]
sample_every_n_steps = 10
[logging]
log_with = "tensorboard"
[general]
shuffle_caption = true
random_crop = true
[training]
cache_text_encoder_outputs_to_disk = true
cache_latents = true
lr_scheduler = "linear"
lr_warmup_steps = 100.0""")
    assert problems(root, text) == [
        "training.lr_warmup_steps: a float is a fraction of the total steps and must be < 1, got 100.0; write an"
        " integer for a step count",
        "training.cache_text_encoder_outputs cannot be used with network.train_text_encoder = true",
        "training.cache_text_encoder_outputs: datasets[0].subsets[0] sets shuffle_caption, which change the caption"
        " every epoch, so its text encoder outputs cannot be cached",
        "training.cache_latents: datasets[0].subsets[0] sets random_crop, which changes the latents every epoch, so"
        " they cannot be cached",
        "sampling.prompts is required when sampling is on (sample_every_n_steps / sample_every_n_epochs /"
        " sample_at_first)",
        "logging.log_with = 'tensorboard' needs logging.logging_dir",
    ]


def test_model_paths_and_warnings(root):
    base = MINIMAL.replace('"builtin:tiny-sdxl"', '"builtin:tiny-sdl"')
    assert problems(root, base) == [
        "model.pretrained: unknown built-in model 'tiny-sdl'; built-ins: 'builtin:tiny-sdxl', 'builtin:tiny-flux';"
        " did you mean 'tiny-sdxl'?"]
    ckpt = root / "m.ckpt"
    ckpt.write_bytes(b"x")
    assert problems(root, MINIMAL.replace('"builtin:tiny-sdxl"', '"m.ckpt"')) == [
        f"model.pretrained: {ckpt} is not a .safetensors file (.ckpt is not supported)"]
    assert problems(root, MINIMAL.replace('"builtin:tiny-sdxl"', '"none.safetensors"')) == [
        f"model.pretrained: {root / 'none.safetensors'} does not exist"]
    c = load_config(cfg_file(root, MINIMAL.replace('"builtin:tiny-sdxl"', '"none.safetensors"')), check_paths=False)
    assert c.model.family == "auto"
    flux = MINIMAL.replace('pretrained = "builtin:tiny-sdxl"', 'pretrained = "builtin:tiny-sdxl"\nfamily = "flux"')
    assert problems(root, flux) == ["model.family: 'flux' does not match 'builtin:tiny-sdxl' (sdxl)"]
    c = load_config(cfg_file(root, MINIMAL), ["network.text_encoder_lr=1e-5", "saving.save_last_n=2",
                                              "training.optimizer=prodigy"])
    assert [w.split(" ")[0] for w in c.warnings] == [
        "network.text_encoder_lr", "training.learning_rate", "saving.save_last_n"]
    assert problems(root, MINIMAL, ["training.lr_warmup_steps=10"]) == [
        "training.lr_warmup_steps: lr_scheduler = 'constant' takes no warmup (kohya refuses it too); use"
        " 'constant_with_warmup' or remove lr_warmup_steps"]


def test_toml_package_fallback(root, monkeypatch):
    """Python 3.10 has no tomllib: the ``toml`` package parses, with the same error shape."""
    import trainer.tomlfile as tomlfile

    monkeypatch.setattr(tomlfile, "_toml", None)
    c = load_config(cfg_file(root, MINIMAL), ["training.learning_rate=5e-5", "training.output_dir=/tmp/x"])
    assert c.training.learning_rate == 5e-5 and c.training.output_dir == "/tmp/x"
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file(root, MINIMAL.replace('output_dir = "out"', "output_dir = = 1")))
    assert str(e.value).startswith(f"{root / 'dog.toml'}: line 5, column ") and "invalid TOML" in str(e.value)


def test_schema_engine_basics():
    schema = Schema([Field("flag", Bool(), False, help="a switch"), Field("n", Int(min=0), 1, required=True),
                     Field("x", Float(), 0.5)])
    ctx = Context([])
    assert schema.validate({"n": 3, "x": 2}, "t", ctx) == {"flag": False, "n": 3, "x": 2.0} and not ctx.errors
    assert isinstance(schema.validate({"n": 1, "x": 2}, "t", ctx)["x"], float)  # floats accept ints
    schema.validate({"flag": 0, "x": True, "y": 1}, "t", ctx)
    assert ctx.errors == ["t.flag: expected true or false, got 0", "t.x: expected a number, got true",
                          "unknown key 'y' in t", "t.n is required"]
    text = describe(schema, "t")
    assert "| `flag` | true or false | false | - | a switch |" in text and "(required)" in text
    err = ConfigError(["one"], "f.toml")
    assert str(err) == "f.toml: one" and "2 problems" in str(ConfigError(["a", "b"]))
