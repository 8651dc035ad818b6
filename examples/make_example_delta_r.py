"""Write a ΔR file with random ΔR on a given basis (a stand-in for a trained file)."""

import argparse
import os

import torch

from qrlora import deltar
from qrlora.basis import load_basis

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("basis")
parser.add_argument("output")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--scale", type=float, default=0.01)
args = parser.parse_args()

basis = load_basis(args.basis)
g = torch.Generator().manual_seed(args.seed)
delta_r = {t.name: torch.randn(basis.rank, t.shape[1], generator=g) * args.scale for t in basis.targets}
name = os.path.splitext(os.path.basename(args.output))[0]
d = deltar.from_basis(basis, delta_r, alpha=basis.rank, mask="triu",
                      metadata={"qrlora.note": "random ΔR written by examples/make_example_delta_r.py"})
deltar.save(d, args.output, output_name=name, base_model=basis.source.get("base_model", ""))
print(f"wrote {args.output} ({len(d.layers)} layers, rank {d.rank}, basis {d.basis_id})")
