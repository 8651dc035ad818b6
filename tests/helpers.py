"""Small builders shared by the tests."""

import os
import subprocess
import sys

import torch

from qrlora.archs import Target
from qrlora.basis import Basis, compute_basis
from qrlora.deltar import from_basis


def synthetic_basis(arch="sdxl", rank=4, shapes=((24, 16), (16, 40), (48, 16)), seed=0, prefix="unet.blocks"):
    """A basis over made-up layers with random weights (enough for file-format tests)."""
    g = torch.Generator().manual_seed(seed)
    targets = [Target(f"{prefix}.{i}.to_q", f"model.{i}.weight", None, tuple(s)) for i, s in enumerate(shapes)]
    weights = {t.name: torch.randn(*t.shape, generator=g) for t in targets}
    q, bid = compute_basis(lambda t: weights[t.name], targets, arch, rank, device="cpu")
    return Basis(arch, rank, targets, q, bid, "test-layers"), weights


def random_delta_r(basis, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(basis.rank, t.shape[1], generator=g) * scale for t in basis.targets}


def synthetic_file(basis, seed=1, alpha=None, mask="triu", **kw):
    return from_basis(basis, random_delta_r(basis, seed), alpha=alpha or basis.rank, mask=mask, **kw)


def launch_two_processes(config: str, **env_extra) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the trainer in two processes (a user's multi-GPU command). On a
    machine without GPUs ``--multi_gpu`` starts torchrun and the trainer joins the processes over
    gloo on the CPU (accelerate's own ``--cpu`` starts one process unless under MPI). The timeout
    is what a rank left waiting in a collective would hit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "--config", config],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
