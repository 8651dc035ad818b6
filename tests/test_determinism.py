"""Same inputs, same file: the trainer's result does not depend on what a cache holds or on
which optional packages once filled it, and every input that decides it is recorded."""

import json
import os
import shutil

from qrlora.checkpoint import read_header
from trainer import tokenizers as T
from trainer.config import load_config
from trainer.loop import Trainer

from tests.test_trainer_e2e import write_config


REAL_BPE_PATH = T.open_clip_bpe_path


def _train(config, cache, monkeypatch, open_clip_installed):
    monkeypatch.setenv("QRLORA_CACHE", cache)
    monkeypatch.setattr(T, "open_clip_bpe_path", REAL_BPE_PATH if open_clip_installed else lambda: None)
    logs = []
    tr = Trainer(load_config(config), log=logs.append)
    tr.prepare()
    assert tr.train() == 0
    return logs


def _prefill_full_vocabulary(cache):
    """What an environment with open-clip-torch leaves in the cache: CLIP's full vocabulary
    (derived from the real BPE file when it is installed, else a stand-in in its place)."""
    folder = os.path.join(cache, "tokenizers")
    if REAL_BPE_PATH() is not None:
        T.full_clip_tokenizer_folder(folder)
    else:
        merges = T.learn_merges(T._TINY_WORDS, 50)
        T._write_tokenizer_folder(os.path.join(folder, "clip-bpe-16e6"), T.vocab_from_merges(merges), merges)


def test_clean_and_prefilled_caches_give_byte_identical_files(tmp_path, monkeypatch, single_threaded):
    config = write_config(str(tmp_path), steps=2, saving="save_state = false", repeats=1)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tmp_path / "out" / "dog.safetensors"

    # a machine that never had open-clip-torch, with an empty cache
    logs = _train(config, str(tmp_path / "clean-cache"), monkeypatch, open_clip_installed=False)
    first = out.read_bytes()
    shutil.rmtree(tmp_path / "out")

    # a machine whose cache an open-clip-torch install once filled with CLIP's full vocabulary
    filled = str(tmp_path / "filled-cache")
    _prefill_full_vocabulary(filled)
    _train(config, filled, monkeypatch, open_clip_installed=True)
    assert out.read_bytes() == first

    # the choices are printed and recorded
    lines = "\n".join(logs).splitlines()
    assert any(line.startswith("tokenizer: the tiny model's own BPE") for line in lines)
    assert any(line.startswith("base model: builtin:tiny-sdxl (content sdxl-") for line in lines)
    meta = read_header(str(out))[1]
    tokenizer = json.loads(meta["qrlora.tokenizer"])
    assert tokenizer["kind"] == "built-in tiny BPE" and len(tokenizer["sha256"]) == 64
    base = json.loads(meta["qrlora.base_model"])
    assert base["pretrained"] == "builtin:tiny-sdxl" and base["identity"].startswith("sdxl-")
    assert meta["ss_training_started_at"] == meta["ss_training_finished_at"] == "1700000000"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20"
