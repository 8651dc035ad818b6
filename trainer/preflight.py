"""Everything a run will need later, checked before any model is loaded.

A run that stops after an hour because the output folder is read-only, TensorBoard is not
installed, a sample prompt file does not parse or image 812 is truncated has wasted that hour.
``preflight`` finds all of those first, in ``--dry-run`` too, and reports every problem in one
message (a user fixes them in one pass); the CLI prints it as one error and exits 2.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Callable

from qrlora.errors import UserError
from trainer.config import Config
from trainer.families import BUILTIN_PREFIX, cache_root
from trainer.schema import ConfigError

PROBE_BYTES = 1 << 16  # written and fsynced: a full disk fails here, not at the first save

# (is it needed by this config?, module the run imports, what needs it, how to install it)
OPTIONAL_PACKAGES: tuple[tuple[Callable[[Config], bool], str, str, str], ...] = (
    (lambda c: bool(c.logging.logging_dir) and c.logging.log_with == "tensorboard", "torch.utils.tensorboard",
     "logging.logging_dir (TensorBoard logging)", "pip install tensorboard"),
    (lambda c: c.training.optimizer.lower() == "adamw8bit", "bitsandbytes", "training.optimizer = 'adamw8bit'",
     "pip install bitsandbytes"),
    (lambda c: c.training.optimizer.lower() == "prodigy", "prodigyopt", "training.optimizer = 'prodigy'",
     "pip install prodigyopt"),
)


def preflight(cfg: Config, plan=None) -> list[str]:
    """Check what the run will need; raise one ``ConfigError`` listing every problem found.
    Returns warnings worth printing before the models load. ``plan``: the dataset plan, if
    the caller already has it."""
    problems: list[str] = []
    warnings: list[str] = []
    problems += writable_folders(cfg)
    problems += missing_packages(cfg)
    problems += prompt_problems(cfg, warnings)
    if plan is None:
        plan = cfg.dataset_plan()
    problems += image_problems(plan)
    problems += model_file_problems(cfg)
    if problems:
        raise ConfigError(problems, cfg.source)
    return warnings


# ----------------------------------------------------------------- model files
def model_file_problems(cfg: Config) -> list[str]:
    """The model family's own check of its files from their headers, where it has one (FLUX: every
    part found, and a basis for an fp8-only transformer). A model that cannot even be recognised
    is left to the load, which names it."""
    from trainer.setup import family_for

    try:
        check = getattr(family_for(cfg), "check_files", None)
    except UserError:
        return []
    try:
        if check is not None:
            check(cfg)
    except ConfigError as e:
        return list(e.problems)
    except UserError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------- folders
def writable_folders(cfg: Config) -> list[str]:
    """Every folder the run writes to: outputs and states, TensorBoard logs, the basis cache
    and the cache the built-in model and derived tokenizers live in."""
    folders = [("training.output_dir", cfg.training.output_dir)]
    if cfg.logging.logging_dir and cfg.logging.log_with == "tensorboard":
        folders.append(("logging.logging_dir", cfg.logging.logging_dir))
    if cfg.network.type == "qrlora":
        from qrlora.cli import default_cache_dir

        folders.append(("network.basis_cache", cfg.network.basis_cache or default_cache_dir()))
    pretrained = cfg.model.pretrained
    if pretrained.startswith(BUILTIN_PREFIX) or not (cfg.model.tokenizer or os.path.isdir(pretrained)):
        folders.append(("the cache folder ($QRLORA_CACHE)", cache_root()))
    return [p for key, folder in folders if (p := folder_problem(key, folder))]


def folder_problem(key: str, folder: str) -> str | None:
    """Why files cannot be written in ``folder`` (or in the folder it would be created in), or
    None. Really writes and deletes a probe file: permission bits say nothing for root, a
    read-only mount or a full disk."""
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = f"{existing} is a file" if existing != path else "it is a file, not a folder"
        return f"{key}: {folder} cannot be used as a folder: {what}"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".qrlora-write-test-")
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        where = folder if existing == path else f"{existing} (where {folder} would be created)"
        return f"{key}: cannot write in {where}: {e.strerror or e}"
    return None


# ----------------------------------------------------------------- packages
def missing_packages(cfg: Config) -> list[str]:
    """Optional packages this config needs, really imported (an install can be broken)."""
    problems = []
    for needed, module, what, install in OPTIONAL_PACKAGES:
        if not needed(cfg):
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  a broken install fails in many ways; report any
            problems.append(f"{what} needs {module}, which cannot be imported ({type(e).__name__}: {e}): {install}")
    return problems


# ----------------------------------------------------------------- sample prompts
def prompt_problems(cfg: Config, warnings: list[str]) -> list[str]:
    """The sample prompts parse, name known samplers, and there is one when sampling is on."""
    from trainer.sampling import prompts_of

    s = cfg.sampling
    if not s.prompts:
        return []
    try:
        prompts = prompts_of(cfg)
    except UserError as e:
        return [f"sampling.prompts: {e}"]
    except (OSError, UnicodeDecodeError) as e:
        return [f"sampling.prompts: {s.prompts} cannot be read ({getattr(e, 'strerror', None) or e})"]
    sampling_on = s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first
    if not prompts and sampling_on:
        return [f"sampling.prompts: {s.prompts} holds no prompt (blank lines and # comments are skipped)"]
    problems = []
    samplers = _family_samplers(cfg)
    for p in prompts:
        if p.unknown:
            warnings.append(f"sample prompt {p.index + 1}: options not understood: {', '.join(p.unknown)}")
        if samplers and p.sampler and p.sampler not in samplers:
            problems.append(f"sampling.prompts: prompt {p.index + 1} asks for sampler {p.sampler!r}; "
                            f"known: {', '.join(samplers)}")
        if not p.prompt:
            problems.append(f"sampling.prompts: prompt {p.index + 1} has no text before its options")
    return problems


def _family_samplers(cfg: Config) -> tuple[str, ...]:
    from trainer.setup import family_for

    try:
        return family_for(cfg).samplers
    except (UserError, ValueError, OSError):
        return ()  # an unknown model is reported where it is loaded


# ----------------------------------------------------------------- images
def image_problems(plan) -> list[str]:
    """Every dataset image opened and fully decoded (remembered by path, size and time in the
    cache, so a re-run decodes only what changed), then placed in its bucket."""
    from trainer import images
    from trainer.data import place_items

    paths = [item.path for spec in plan.datasets for item in spec.items]
    bad = images.find_bad_images(paths, cache_root("image-checks.json"))
    if bad:
        return [f"image {path} {why}" for path, why in bad]
    try:
        place_items(plan)
    except UserError as e:
        return [str(e)]
    return []
