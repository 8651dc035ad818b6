"""What an installation puts into a user's environment: the core under this project's own name
(``qrlora``) and the promised ``python -m trainer``, never generic top-level ``shared`` or
``extension`` modules that would shadow, or be shadowed by, other projects."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("name", ["shared", "extension"])
def test_generic_names_are_not_installed(tmp_path, name):
    out = _run([sys.executable, "-c", f"import {name}"], cwd=str(tmp_path))
    assert out.returncode != 0 and "No module named" in out.stderr, (name, out.stdout, out.stderr)


def test_core_and_commands_work_from_any_folder(tmp_path):
    out = _run([sys.executable, "-c", "import qrlora, qrlora.cli, trainer; print(qrlora.__file__)"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(out.stdout.strip()).startswith(os.path.realpath(os.path.join(ROOT, "shared")))
    out = _run([sys.executable, "-m", "trainer", "--config", os.path.join(ROOT, "examples", "demo.toml"), "--dry-run"],
               cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    qrlora = os.path.join(os.path.dirname(sys.executable), "qrlora")
    out = _run([qrlora, "--help"], cwd=str(tmp_path))
    assert out.returncode == 0 and "usage: qrlora" in out.stdout, out.stderr


def test_repository_code_imports_the_core_as_qrlora_only():
    """Tests, benches, the trainer and the examples never import the core as ``shared``
    (one module object per file: two names would mean two copies with diverging state)."""
    import re

    bad = []
    for folder in ("trainer", "tests", "bench", "examples", "shared", "extension"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    for i, line in enumerate(fh, 1):
                        if re.match(r"\s*(from|import)\s+(shared|extension)(\.|\s|$)", line):
                            bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
