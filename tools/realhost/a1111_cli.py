"""The `qrlora` command-line steps of the real-A1111 check (``a1111_check.py``): they run with the
project's own Python on the WebUI's checkpoint and record into the same results."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def safetensors_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)).get("__metadata__", {})


def run_qrlora(python: str, args: list[str], log: list[str]) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run([python, "-m", "qrlora", *args], capture_output=True, text=True, cwd=PROJECT)
    seconds = time.perf_counter() - started
    output = (done.stdout + done.stderr).replace("\r", "\n")
    # the progress bar's redraws, once per layer, are kept as their last state only
    bars = [line for line in output.splitlines() if line.startswith("basis [")]
    shown = "\n".join(line for line in output.splitlines() if not line.startswith("basis [") and line.strip())
    log.append(f"$ qrlora {' '.join(args)}  [exit {done.returncode}, {seconds:.1f} s]\n{shown}\n"
               f"progress bar: {len(bars)} redraws, last: {bars[-1].strip() if bars else '-'}\n")
    if done.returncode != 0:
        raise RuntimeError(f"qrlora {args[0]} exited {done.returncode}: {output.strip().splitlines()[-1:]}")
    return output, seconds


def check_cli(webui, python: str, results) -> None:
    """``webui``: a1111_check.WebUI; ``results``: a1111_check.Results."""
    folder = os.path.join(webui.run_dir, "cli")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cache = os.path.join(folder, "basis-cache")
    checkpoint = os.path.join(webui.webui, "models", "Stable-diffusion", "tiny-sdxl.safetensors")
    official, imported = os.path.join(folder, "official.safetensors"), os.path.join(folder, "imported.safetensors")
    lora, fused = os.path.join(folder, "imported-lora.safetensors"), os.path.join(folder, "fused.safetensors")
    log: list[str] = []
    try:
        subprocess.run([python, os.path.join(PROJECT, "tools", "realhost", "official_file.py"), checkpoint,
                        "--rank", "4", "-o", official], check=True, capture_output=True)

        def basis_lines(output: str) -> str:
            return "; ".join(line.strip() for line in output.splitlines()
                             if line.startswith("basis ") and not line.startswith("basis ["))

        def cache_check():
            out1, s1 = run_qrlora(python, ["import-official", official, "--base", checkpoint, "--cache", cache,
                                           "-o", imported], log)
            out2, s2 = run_qrlora(python, ["export", imported, "--to", "kohya", "--base", checkpoint,
                                           "--cache", cache, "-o", lora], log)
            counts = [int(d) for d in re.findall(r"^basis \[[#.]*\] (\d+)/\d+", out1, flags=re.M)]
            steps = [b - a for a, b in zip([0] + counts, counts)]
            total = int(re.search(r"^basis \[[#.]*\] \d+/(\d+)", out1, flags=re.M).group(1)) if counts else 0
            results.record("cli-progress", bool(counts) and counts[-1] == total and max(steps) <= total / 4,
                           f"import-official's progress bar: {len(counts)} updates up to {counts[-1] if counts else 0}"
                           f"/{total}, largest step {max(steps) if steps else 0}")
            files = sorted(name for name in os.listdir(cache) if name.endswith(".safetensors"))
            once = "computed" in basis_lines(out1) and "from cache" in basis_lines(out2) \
                and "computed" not in basis_lines(out2)
            results.record("cli-cache", once and len(files) == 1,
                           f"import-official ({s1:.1f} s): {basis_lines(out1)!r}; then export ({s2:.1f} s): "
                           f"{basis_lines(out2)!r}; basis files in the cache: {files}")

        def metadata_check():
            dog = os.path.join(webui.webui, "models", "QRLoRA", "dog.safetensors")
            run_qrlora(python, ["fuse", f"{dog}:1.0", f"{imported}:0.5", "-o", fused], log)
            names = {os.path.basename(p): safetensors_metadata(p).get("ss_sd_model_name", "")
                     for p in (imported, fused)}
            results.record("cli-metadata", all(names.values()), f"ss_sd_model_name: {names}")

        results.guarded("cli-cache", cache_check)
        results.guarded("cli-metadata", metadata_check)
    finally:
        with open(os.path.join(folder, "cli.log"), "w", encoding="utf-8") as f:
            f.write("\n".join(log))
