"""T5 tokenizers for FLUX without a hub.

CLIP-L's tokenizer is found as for SDXL (``trainer.tokenizers.resolve_clip_tokenizers``). T5's,
in order: ``model.t5_tokenizer`` (a local folder), a diffusers FLUX folder's ``tokenizer_2/``,
for ``builtin:tiny-flux`` a small unigram tokenizer built in code on every call (never
downloaded, never cached, so it cannot differ between runs), and last T5 v1.1's own tokenizer
if the Hugging Face cache already holds it (read with ``local_files_only``); else one message
naming ``model.t5_tokenizer``. The tiny tokenizer is built with the ``tokenizers`` package
(which transformers already needs), not sentencepiece.
"""

from __future__ import annotations

import hashlib
import os

from qrlora.errors import UserError

# The tokenizer FLUX's T5-XXL was trained with (what kohya downloads); read from the
# Hugging Face cache only if it is already there.
T5_TOKENIZER_HUB_ID = "google/t5-v1_1-xxl"


def tiny_t5_tokenizer():
    """A small T5-style unigram tokenizer for the built-in tiny FLUX, built in code on every
    call (never downloaded, never cached): T5's special ids (pad 0, </s> 1, <unk> 2), the
    tiny CLIP BPE's caption words, letters and digits; every id below T5's 32,128."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from ..tokenizers import _TINY_WORDS

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {v[0] for v in vocab}
    singles = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"
    pieces = [("▁" + w, -4.0) for w in _TINY_WORDS] + [(c, -9.0) for c in singles] + [("▁" + c, -8.0) for c in singles]
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    digest = hashlib.sha256(tok.to_str().encode()).hexdigest()
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                         model_max_length=512)
    return t5, f"the tiny model's own T5-style unigram (sha256 {digest[:16]})"


def load_t5_tokenizer(t5_tokenizer_dir: str | None, model_dir: str | None, builtin: bool):
    """(tokenizer, description): ``model.t5_tokenizer``, the diffusers folder's ``tokenizer_2``,
    the tiny model's own, or T5 v1.1's from the Hugging Face cache (offline); else an error."""
    from transformers import T5TokenizerFast

    from ..tokenizers import folder_digest, is_tokenizer_folder

    def from_folder(folder: str, kind: str):
        tok = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
        return tok, f"{kind} {folder} (sha256 {folder_digest([folder])[:16]})"

    if t5_tokenizer_dir:
        if not (os.path.isdir(t5_tokenizer_dir) and (is_tokenizer_folder(t5_tokenizer_dir)
                                                     or os.path.isfile(os.path.join(t5_tokenizer_dir, "spiece.model")))):
            raise UserError(f"model.t5_tokenizer: {t5_tokenizer_dir} is not a T5 tokenizer folder "
                              "(tokenizer.json or spiece.model)")
        return from_folder(t5_tokenizer_dir, "model.t5_tokenizer")
    if model_dir and is_tokenizer_folder(os.path.join(model_dir, "tokenizer_2")):
        return from_folder(os.path.join(model_dir, "tokenizer_2"), "model folder")
    if builtin:
        return tiny_t5_tokenizer()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(T5_TOKENIZER_HUB_ID, local_files_only=True)
        if is_tokenizer_folder(folder) or os.path.isfile(os.path.join(folder, "spiece.model")):
            return from_folder(folder, "Hugging Face cache")
    except Exception:  # not cached (or no huggingface_hub): fall through to the message
        pass
    raise UserError(
        "model.t5_tokenizer: no T5 tokenizer available offline; set model.t5_tokenizer to a local folder with "
        f"{T5_TOKENIZER_HUB_ID}'s tokenizer (tokenizer.json or spiece.model, e.g. a diffusers FLUX model's tokenizer_2/)"
    )
