"""How many CPU threads torch should use for a job of a given size.

torch starts one intra-op thread per core. For thousands of small tensor operations (a tiny
model, a small basis) the threads spend more time waking up and waiting for each other than
computing, and on a machine whose cores are busy with other work they wait for a core too:
one thread is then many times faster and gives the same result. Large workloads keep torch's
default.
"""

from __future__ import annotations

import torch

# Below this many elements (model parameters, or weights to decompose) one thread wins.
SMALL_WORKLOAD = 100_000_000


def choose_threads(workload_elements: int, requested: int = 0) -> int:
    """The thread count to use: ``requested`` when > 0, else 1 for a workload under
    ``SMALL_WORKLOAD`` elements, else torch's current setting (its default: one per core)."""
    if requested > 0:
        return int(requested)
    if workload_elements < SMALL_WORKLOAD:
        return 1
    return torch.get_num_threads()


def describe_choice(workload_elements: int, requested: int, threads: int) -> str:
    """One line for logs: the count and why it was chosen."""
    if requested > 0:
        return f"{threads} CPU thread(s) (as set)"
    if workload_elements < SMALL_WORKLOAD:
        return f"{threads} CPU thread (auto: {workload_elements:,} elements is a small workload)"
    return f"{threads} CPU thread(s) (auto: torch's default for {workload_elements:,} elements)"
