"""Our FLUX patches through Forge's *real* patcher and quantized classes, outside the WebUI.

    git --git-dir=<forge mirror> archive HEAD backend packages_3rdparty modules_forge | tar x -C /tmp/forge
    python tools/realhost/forge_patcher_check.py --forge /tmp/forge

Imports Forge's ``backend/patcher/lora.py`` (``LoraLoader``, ``merge_lora_to_weight``),
``backend/operations_gguf.py`` (``ParameterGGUF``, ``dequantize_tensor``), ``backend/operations.py``
(``get_weight_and_bias``) and the vendored ``packages_3rdparty/gguf`` (torch on the CPU; its unused
``vocab`` module wants sentencepiece, stubbed). On the tiny FLUX it puts the patches the extension
makes (``(name, (0, start, length))`` keys, ``("lora", (Q, λ·s·ΔR, None, None, None))``) on
transformer weights stored as bf16 and as GGUF Q8_0 / Q4_0 (offline: dequantize, merge,
re-quantize) and Q4_K (offline must raise NotImplementedError; online through
``get_weight_and_bias``), and compares each slice with W + λ·s·Q·ΔR. bitsandbytes nf4 is checked
only when bitsandbytes imports and CUDA is present (Forge re-quantizes 4-bit weights with
``.cuda()``); otherwise the script says it did not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forge", required=True, help="a checkout of stable-diffusion-webui-forge")
    ap.add_argument("--lam", type=float, default=0.7)
    args = ap.parse_args()
    sys.argv = [sys.argv[0], "--always-cpu"]  # Forge's backend.args parses the command line
    sys.path[:0] = [args.forge, os.path.join(args.forge, "packages_3rdparty"), ROOT]
    from qrlora import deltar
    from qrlora.basis import basis_from_checkpoint
    from qrlora.checkpoint import SafetensorsFile
    from qrlora.tiny import make_tiny

    tiny = make_tiny("flux", tempfile.mkdtemp(), seed=0)
    basis = basis_from_checkpoint(tiny.checkpoint, 4, "flux-official")
    g = torch.Generator().manual_seed(3)
    d = deltar.from_basis(basis, {t.name: torch.randn(4, t.shape[1], generator=g) * 3 for t in basis.targets}, alpha=4.0)
    f = SafetensorsFile(tiny.checkpoint)
    by_param: dict[str, list] = {}
    for t in basis.targets:
        v = ("lora", (basis.q[t.name], args.lam * d.scale * d.layers[t.name], None, None, None))
        offset = (0, t.rows[0], t.rows[1] - t.rows[0]) if t.rows else None
        by_param.setdefault(t.key, []).append((offset, v, basis.q[t.name].double() @ (args.lam * d.scale * d.layers[t.name]).double()))
    results = []
    # after the tiny model is made (diffusers looks for sentencepiece and must not find a stub)
    sys.modules.setdefault("sentencepiece", types.SimpleNamespace(SentencePieceProcessor=object))
    import gguf
    from backend import operations, operations_gguf
    from backend.patcher import lora

    def layer_with(weight):
        m = torch.nn.Module()
        m.weight, m.bias = weight, None
        return m

    def gguf_param(w, qtype):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        if qtype == "Q4_K":  # gguf-py has no Q4_K quantizer: valid blocks with small scales
            rng = np.random.default_rng(0)
            n = w.numel() // 256
            blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
            blocks[:, 0:4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)
            data = blocks
        else:
            data = gguf.quants.quantize(w.float().numpy(), kind)
        reader = types.SimpleNamespace(tensor_type=kind, shape=list(reversed(w.shape)), data=data)
        p = operations_gguf.ParameterGGUF(reader)
        p.gguf_cls.bake(p)
        return p

    def check(storage, make, online=False):
        worst, touched = 0.0, 0
        for key, patches in by_param.items():
            w0 = f.tensor(key)
            model = layer_with(make(w0))
            deq = operations_gguf.dequantize_tensor  # what ForgeOperationsGGUF.Linear.forward passes
            before = operations.get_weight_and_bias(model, weight_fn=deq)[0].double().clone()
            loader = lora.LoraLoader(model)
            entries = [[1.0, v, 1.0, off, None] for off, v, _ in patches]
            try:
                loader.refresh({("qrlora", 1.0, 1.0, online): {"weight": entries}})
            except NotImplementedError as e:
                return f"{storage}: offline merge raises NotImplementedError ({str(e)[:60]}...)"
            after = operations.get_weight_and_bias(model, weight_fn=deq)[0].double()
            for off, _, dw in patches:
                rows = slice(off[1], off[1] + off[2]) if off else slice(None)
                err = float(((after[rows] - before[rows]) - dw).norm() / dw.norm())
                worst, touched = max(worst, err), touched + 1
            loader.refresh({})  # removal
            restored = model.weight
            if not torch.equal(restored.data, make(w0).data if storage.startswith("gguf") else make(w0)):
                return f"{storage}: NOT restored bit-exactly"
        return f"{storage}{' online' if online else ''}: {touched} slices, max ||ΔW_forge - λ·s·Q·ΔR|| / ||λ·s·Q·ΔR|| = {worst:.2e}; removal bit-exact"

    results.append(check("bf16", lambda w: torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)))
    for qtype in ("Q8_0", "Q4_0"):
        results.append(check(f"gguf {qtype}", lambda w, q=qtype: gguf_param(w, q)))
    results.append(check("gguf Q4_K", lambda w: gguf_param(w, "Q4_K")))
    results.append(check("gguf Q4_K", lambda w: gguf_param(w, "Q4_K"), online=True))
    if operations.bnb_avaliable and torch.cuda.is_available():
        results.append("nf4: bitsandbytes and CUDA present, but this script does not build 4-bit layers yet")
    else:
        results.append(f"nf4/fp4: NOT run (bitsandbytes importable: {operations.bnb_avaliable}; CUDA: "
                       f"{torch.cuda.is_available()}; Forge quantizes 4-bit weights with .cuda())")
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
