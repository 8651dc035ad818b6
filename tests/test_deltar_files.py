"""The ΔR file format: round trip, metadata, and one clear error for each bad input."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import deltar
from qrlora.basis import SKETCH_KEY
from qrlora.checkpoint import FileFormatError, read_header
from tests.helpers import synthetic_basis, synthetic_file


@pytest.fixture()
def basis():
    return synthetic_basis()[0]


def test_round_trip_keeps_values_and_metadata(basis, tmp_path):
    d = synthetic_file(basis, alpha=2.0, metadata={"ss_tag_frequency": '{"dog": {"sks dog": 3}}'})
    path = str(tmp_path / "dog.safetensors")
    deltar.save(d, path, dtype=torch.float32, output_name="dog", base_model="tiny.safetensors")
    back = deltar.load(path)
    assert back.names == d.names
    for n in d.names:
        assert torch.equal(back.layers[n], d.layers[n])
        assert back.targets[n] == d.targets[n]
    assert (back.rank, back.alpha, back.mask, back.basis_id) == (4, 2.0, "triu", basis.basis_id)
    assert back.scale == 0.5
    assert torch.equal(back.sketch, basis.sketch())
    meta = back.metadata
    assert meta["ss_network_module"] == "qrlora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_output_name"] == "dog" and meta["modelspec.title"] == "dog"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/qrlora"
    assert meta["ss_tag_frequency"] == '{"dog": {"sks dog": 3}}'
    assert not back.portable


def test_triu_mask_is_applied_on_write(basis, tmp_path):
    d = synthetic_file(basis, mask="none")
    d.mask = "triu"
    path = str(tmp_path / "m.safetensors")
    deltar.save(d, path)
    raw = load_file(path)
    for n in d.names:
        assert torch.count_nonzero(raw[f"{n}.delta_r"].tril(-1)) == 0


def test_portable_file_embeds_q(basis, tmp_path):
    d = synthetic_file(basis, embed_q=True)
    path = str(tmp_path / "p.safetensors")
    deltar.save(d, path)
    back = deltar.load(path)
    assert back.portable
    for n in d.names:
        assert torch.equal(back.q[n], basis.q[n])


def test_fp16_storage_is_close(basis, tmp_path):
    d = synthetic_file(basis)
    path = str(tmp_path / "h.safetensors")
    deltar.save(d, path)  # fp16 default
    back = deltar.load(path)
    for n in d.names:
        assert torch.allclose(back.layers[n], d.layers[n], atol=1e-3)
    assert read_header(path)[0][f"{d.names[0]}.delta_r"]["dtype"] == "F16"


def test_write_is_atomic_and_refuses_nan(basis, tmp_path):
    path = str(tmp_path / "x.safetensors")
    good = synthetic_file(basis)
    deltar.save(good, path)
    before = open(path, "rb").read()
    bad = synthetic_file(basis)
    bad.layers[bad.names[1]][0, 0] = float("inf")
    with pytest.raises(ValueError, match="contains NaN or Inf; refusing"):
        deltar.save(bad, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


# ----------------------------------------------------------------- bad inputs
def _rewrite(path, tensors=None, meta_update=None, drop=()):
    tensors = tensors if tensors is not None else load_file(path)
    meta = read_header(path)[1]
    meta.update(meta_update or {})
    for k in drop:
        tensors.pop(k, None)
    save_file(tensors, path, metadata=meta)


@pytest.fixture()
def good_file(basis, tmp_path):
    path = str(tmp_path / "good.safetensors")
    deltar.save(synthetic_file(basis), path)
    return path


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}}, f)
    with pytest.raises(FileFormatError, match=r"model\.ckpt: not a safetensors file"):
        deltar.load(str(path))


def test_truncated(good_file):
    data = open(good_file, "rb").read()
    with open(good_file, "wb") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        deltar.load(good_file)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        deltar.load(str(path))


def test_shape_disagrees_with_metadata(good_file, basis):
    tensors = load_file(good_file)
    key = f"{basis.targets[0].name}.delta_r"
    tensors[key] = torch.zeros(4, 99, dtype=torch.float16)
    _rewrite(good_file, tensors)
    with pytest.raises(FileFormatError, match=rf"{key} has shape \(4, 99\), metadata says \(4, 16\)"):
        deltar.load(good_file)


def test_nan(good_file, basis):
    tensors = load_file(good_file)
    key = f"{basis.targets[2].name}.delta_r"
    tensors[key][0, 0] = float("nan")
    _rewrite(good_file, tensors)
    with pytest.raises(FileFormatError, match=rf"{key} contains NaN or Inf"):
        deltar.load(good_file)


def test_unknown_architecture(good_file):
    _rewrite(good_file, meta_update={"qrlora.arch": "sd3"})
    with pytest.raises(FileFormatError, match="unknown architecture 'sd3'"):
        deltar.load(good_file)


def test_wrong_architecture_for_the_model(good_file):
    with pytest.raises(FileFormatError, match="trained for sdxl, but the loaded model is flux"):
        deltar.load(good_file, expect_arch="flux")


def test_newer_format_version(good_file):
    _rewrite(good_file, meta_update={"qrlora.format_version": "7"})
    with pytest.raises(FileFormatError, match="format 7, newer than this qrlora reads"):
        deltar.load(good_file)


def test_missing_layers(good_file, basis):
    _rewrite(good_file, drop=[f"{basis.targets[1].name}.delta_r"])
    with pytest.raises(FileFormatError, match=rf"1 listed layers have no ΔR tensor \(first: {basis.targets[1].name}\)"):
        deltar.load(good_file)


def test_unlisted_tensor(good_file):
    tensors = load_file(good_file)
    tensors["unet.extra.delta_r"] = torch.zeros(4, 4)
    _rewrite(good_file, tensors)
    with pytest.raises(FileFormatError, match="'unet.extra.delta_r' is not listed"):
        deltar.load(good_file)


def test_bad_sketch(good_file):
    tensors = load_file(good_file)
    tensors[SKETCH_KEY] = torch.zeros(2, 2, 4)
    _rewrite(good_file, tensors)
    with pytest.raises(FileFormatError, match="basis_sketch has shape"):
        deltar.load(good_file)


def test_malformed_metadata(good_file):
    _rewrite(good_file, meta_update={"qrlora.rank": "four"})
    with pytest.raises(FileFormatError, match="qrlora.rank is missing or not a number"):
        deltar.load(good_file)
    _rewrite(good_file, meta_update={"qrlora.rank": "4", "qrlora.layers": "[[1,2"})
    with pytest.raises(FileFormatError, match="qrlora.layers is missing or malformed"):
        deltar.load(good_file)


def test_foreign_files_are_named(tmp_path):
    lora = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(3, 2)}, lora)
    with pytest.raises(FileFormatError, match="a standard LoRA"):
        deltar.load(lora)
    official = str(tmp_path / "official.safetensors")
    save_file({"transformer.a.lora.delta_r.weight": torch.zeros(2, 3)}, official)
    with pytest.raises(FileFormatError, match="qrlora import-official"):
        deltar.load(official)


def test_header_metadata_is_plain_json(good_file):
    meta = read_header(good_file)[1]
    layers = json.loads(meta["qrlora.layers"])
    assert layers[0][:3] == ["unet.blocks.0.to_q", 24, 16]
