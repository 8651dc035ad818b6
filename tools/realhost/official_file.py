"""Write an SDXL ΔR file in the official QR-LoRA layout for a given checkpoint (for the
real-host check of ``qrlora import-official``).

    python tools/realhost/official_file.py CHECKPOINT --rank 4 -o official.safetensors

Per UNet layer of the checkpoint's basis targets: ``unet.<layer>.lora.q.weight`` and
``.lora.base_r.weight`` from the official maths (full SVD, QR of the rank-r core, no sign
normalisation; ``tests/official_reference.py``) and a random upper-triangular ΔR, no metadata.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, PROJECT)

from qrlora.basis import basis_from_checkpoint  # noqa: E402
from qrlora.checkpoint import SafetensorsFile  # noqa: E402
from tests.official_reference import official_qr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    targets = basis_from_checkpoint(args.checkpoint, args.rank).targets  # the names and keys only
    f = SafetensorsFile(args.checkpoint)
    g = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for t in targets:
        q, r = official_qr(f.tensor(t.key).float(), args.rank)
        tensors[f"{t.name}.lora.q.weight"] = q
        tensors[f"{t.name}.lora.base_r.weight"] = r
        tensors[f"{t.name}.lora.delta_r.weight"] = torch.triu(torch.randn(args.rank, t.shape[1], generator=g) * 0.1)
    save_file(tensors, args.output, metadata={"format": "pt"})
    print(f"wrote {args.output}: {len(targets)} layers in the official layout")


if __name__ == "__main__":
    main()
