"""`<qrlora:…>` on a full-size fp8 FLUX.1-dev in the real, running Forge (CPU, offline).

    python tools/realhost/forge_setup.py --forge-git-dir DIR --work /tmp/realhost/forge
    python tools/realhost/forge_check.py --work /tmp/realhost/forge

Run it with this project's Python after ``forge_setup.py``. It starts Forge in API mode on the
fp8 single file (transformer and T5 in float8_e4m3fn: on a CPU Forge computes in float32 and
keeps 16-bit weights as float32, ~48 GB for FLUX, while fp8 weights stay as stored), with the
weight-dump extension saving the weights of a few transformer modules at the first forward of
each generation. Five txt2img generations (64×64, one Euler step, distilled CFG 3.5):

1. untagged;
2. ``<qrlora:NAME:0.7>`` with the basis file taken out of the basis folder: the console names
   the basis needed and the command that makes it, and nothing is applied;
3. the same with the basis file back (made once from the bf16 original by ``qrlora basis``);
4. untagged again;
5. ``<lora:EXPORTED:0.7>``, the kohya export of the same ΔR.

Forge is then killed (``server-stop`` does not end ``--nowebui``) and the dumps compared:
each tagged slice (qkv's q/k/v, linear1's q/k/v/MLP, a whole proj) against W + 0.7·s·Q·ΔR,
where W is the fp8 weight Forge loaded; Forge's offline merge adds in float32 and rounds to fp8
once, so every element must lie within half an fp8 step of the exact sum. Untouched modules
unchanged, removal bit-exact, ``<lora:>`` against ``<qrlora:>``. PASS/FAIL lines,
``WORK/run/results.json`` and ``results.md``; exit status 0 iff all pass.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from forge_setup import DELTA_NAME, LORA_NAME, paths  # noqa: E402

LAMBDA = 0.7
PROMPT = "a photo of a dog"
# the modules the weight dump saves: three that carry the ΔR, two that must stay untouched
TAGGED = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.1.img_attn.proj"]
UNTOUCHED = ["double_blocks.0.txt_attn.qkv", "single_blocks.1.linear1"]
GENERATIONS = [  # (label, prompt suffix, basis file in place)
    ("untagged", "", True),
    ("no-basis", f" <qrlora:{DELTA_NAME}:{LAMBDA}>", False),
    ("qrlora", f" <qrlora:{DELTA_NAME}:{LAMBDA}>", True),
    ("untagged-again", "", True),
    ("lora", f" <lora:{LORA_NAME}:{LAMBDA}>", True),
]


def log(msg: str) -> None:
    print(f"[check] {msg}", flush=True)


# ------------------------------------------------------------------ Forge
class Forge:
    def __init__(self, p: dict, run_dir: str, port: int):
        self.p, self.run_dir, self.port = p, run_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(run_dir, "forge.log")
        self.proc = None
        self.peak_kib = 0

    def start(self) -> float:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": os.path.join(self.run_dir, "hf"), "QRLORA_DUMP_DIR": os.path.join(self.run_dir, "dump"),
               "QRLORA_DUMP_LAYERS": ",".join(TAGGED + UNTOUCHED)}
        settings = os.path.join(self.run_dir, "config.json")
        with open(settings, "w", encoding="utf-8") as f:  # fresh settings; no live previews
            json.dump({"live_previews_enable": False, "show_progress_every_n_steps": -1}, f)
        cmd = [self.p["python"], "launch.py", "--skip-prepare-environment", "--always-cpu", "--skip-torch-cuda-test",
               # --no-hashing: Forge's SHA-256 of the 17 GB file is not needed here (16 s idle, 10 min loaded)
               "--skip-version-check", "--no-hashing", "--nowebui", "--port", str(self.port), "--ui-settings-file", settings,
               "--ckpt", os.path.relpath(self.p["fp8"], self.p["webui"])]
        log("$ " + " ".join(cmd))
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.p["webui"], env=env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"Forge exited with status {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/sdapi/v1/samplers")
                return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(2)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 1800):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def txt2img(self, prompt: str) -> tuple[dict, float]:
        started = time.perf_counter()
        out = self.post("/sdapi/v1/txt2img", {
            "prompt": prompt, "seed": 1234, "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
            "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "batch_size": 1, "n_iter": 1})
        return out, time.perf_counter() - started

    def memory(self) -> None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except OSError:
            pass

    def console(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.memory()
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: Forge and nothing else
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ------------------------------------------------------------------ comparisons
def fp8_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn around |x| (3 mantissa bits; subnormal below 2^-6)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -6)))
    return torch.pow(2.0, e - 3)


def load_dump(dump_dir: str, gen: int, module: str) -> torch.Tensor:
    from safetensors.torch import load_file

    t = load_file(os.path.join(dump_dir, f"gen{gen:02d}-{module}.safetensors"))
    if "scale_weight" in t:
        raise SystemExit(f"{module} carries scale_weight: this check expects a plain fp8 file")
    return t["weight"]


def expected_deltas(p: dict) -> dict:
    """module -> [(rows, λ·s·Q·ΔR in float64)], from the ΔR file and the basis file."""
    from qrlora import deltar
    from qrlora.basis import load_basis

    basis = load_basis(p["basis"])
    d = deltar.load(p["delta"])
    out: dict = {}
    for name in d.names:
        t = d.targets[name]
        module = t.key[: -len(".weight")]
        rows = t.rows or (0, t.shape[0])
        dw = LAMBDA * d.delta_weight(name, basis.q[name].double()).double()
        out.setdefault(module, []).append((rows, dw, name))
    return out


def slice_report(merged: torch.Tensor, loaded: torch.Tensor, bf16: torch.Tensor, rows, dw: torch.Tensor) -> dict:
    m = merged[rows[0]:rows[1]].double()
    w = loaded[rows[0]:rows[1]].double()
    exact = w + dw  # what Forge adds before rounding to fp8
    err_steps = float(((m - exact).abs() / fp8_step(exact)).max())
    # for the record: fp8(W_bf16 + ΔW), rounded once from the 16-bit original; Forge's result
    # differs from it where the fp8 file's own rounding of W and the merge's rounding add up
    once = (bf16[rows[0]:rows[1]].double() + dw).to(torch.float8_e4m3fn).double()
    vs_once = float(((m - once).abs() / fp8_step(once)).max())
    equal_once = float((m == once).double().mean())
    rel = float(((m - w) - dw).norm() / dw.norm())
    return {"max_err_fp8_steps": err_steps, "vs_fp8_of_bf16_plus_delta_steps": vs_once,
            "equal_to_fp8_of_bf16_plus_delta": equal_once, "rel_delta_err": rel}


def extension_lines(console: str) -> list[str]:
    return [ln.strip() for ln in console.splitlines() if "[QR-LoRA]" in ln or "[LORA]" in ln or "qrlora" in ln.lower()]


def compare(p: dict, dump_dir: str, gens: dict) -> tuple[list, dict, list]:
    from qrlora.checkpoint import SafetensorsFile

    results = []
    fp8_file, bf16_file = SafetensorsFile(p["fp8"]), SafetensorsFile(p["bf16"])
    deltas = expected_deltas(p)
    g = {label: i + 1 for i, (label, _, _) in enumerate(GENERATIONS)}

    # the untagged weights are the file's fp8 tensors
    same = all(torch.equal(load_dump(dump_dir, g["untagged"], m).view(torch.uint8),
                           fp8_file.tensor(f"model.diffusion_model.{m}.weight").view(torch.uint8)) for m in TAGGED + UNTOUCHED)
    results.append(("loaded-as-stored", same, f"untagged: the {len(TAGGED + UNTOUCHED)} dumped weights are float8_e4m3fn and "
                    f"bit-equal to the file's tensors: {same}"))

    def bits_equal(a_label, b_label, modules):
        return [m for m in modules if not torch.equal(load_dump(dump_dir, g[a_label], m).view(torch.uint8),
                                                        load_dump(dump_dir, g[b_label], m).view(torch.uint8))]

    differ = bits_equal("untagged", "no-basis", TAGGED + UNTOUCHED)
    console = gens["no-basis"]["console"]
    basis_id = gens["basis_id"]
    named = "qrlora basis" in console and basis_id in console
    line = next((ln for ln in console.splitlines() if "qrlora basis" in ln), "")
    results.append(("no-basis", named and not differ,
                    f"basis file removed: weights {'unchanged' if not differ else 'CHANGED in ' + ', '.join(differ)}; "
                    f"console names {basis_id} and the command: {named}; message: {line.strip()[:600]!r}"))

    worst = {"max_err_fp8_steps": 0.0, "vs_fp8_of_bf16_plus_delta_steps": 0.0, "rel_delta_err": 0.0}
    rows_report = []
    for label in ("qrlora", "lora"):
        ok, details = True, []
        for m in TAGGED:
            merged = load_dump(dump_dir, g[label], m)
            loaded = fp8_file.tensor(f"model.diffusion_model.{m}.weight")
            bf16 = bf16_file.tensor(f"{m}.weight")
            covered = torch.zeros(merged.shape[0], dtype=torch.bool)
            for rows, dw, name in deltas[m]:
                r = slice_report(merged, loaded, bf16, rows, dw)
                covered[rows[0]:rows[1]] = True
                good = r["max_err_fp8_steps"] <= 0.5 + 1e-3
                ok &= good
                details.append(f"{m}[{rows[0]}:{rows[1]}] ({name.split('.', 2)[-1]}): "
                               f"max error {r['max_err_fp8_steps']:.3f} fp8 steps, ΔW rel. error {r['rel_delta_err']:.2e}, "
                               f"vs fp8(W_bf16+ΔW) {r['vs_fp8_of_bf16_plus_delta_steps']:.2f} steps "
                               f"({r['equal_to_fp8_of_bf16_plus_delta']:.1%} equal)")
                for k in worst:
                    worst[k] = max(worst[k], r[k])
                rows_report.append({"generation": label, "module": m, "rows": list(rows), **r})
            if not covered.all():  # rows outside every slice must be as loaded
                rest = ~covered
                unchanged = torch.equal(merged[rest].view(torch.uint8), loaded[rest].view(torch.uint8))
                ok &= unchanged
                details.append(f"{m}: rows outside the slices unchanged: {unchanged}")
        differ = bits_equal("untagged", label, UNTOUCHED)
        ok &= not differ
        details.append(f"untouched {', '.join(UNTOUCHED)}: {'unchanged' if not differ else 'CHANGED: ' + ', '.join(differ)}")
        said = extension_lines(gens[label]["console"])
        details.append(f"console: {said[:6]!r}")
        results.append((f"{label}-rows", ok, f"<{'qrlora' if label == 'qrlora' else 'lora'}:…:{LAMBDA}>: " + "; ".join(details)))

    differ = bits_equal("untagged", "untagged-again", TAGGED + UNTOUCHED)
    results.append(("restore", not differ, "untagged after the tag: " + ("all dumped weights bit-identical to the first run"
                                                                         if not differ else "DIFFERS in " + ", ".join(differ))))

    agree = []
    for m in TAGGED:
        a = load_dump(dump_dir, g["qrlora"], m).double()
        b = load_dump(dump_dir, g["lora"], m).double()
        steps = float(((a - b).abs() / fp8_step(torch.maximum(a.abs(), b.abs()))).max())
        agree.append((m, float((a != b).double().mean()), steps))
    ok = all(steps <= 1.0 for _, _, steps in agree)
    results.append(("lora-agrees", ok, "<lora:> vs <qrlora:>: " + "; ".join(
        f"{m}: {frac:.4%} of elements differ, by at most {steps:.0f} fp8 step" for m, frac, steps in agree)))
    return results, worst, rows_report


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="the folder forge_setup.py prepared")
    ap.add_argument("--port", type=int, default=7863)
    args = ap.parse_args(argv)
    p = paths(os.path.abspath(args.work))
    from qrlora.basis import load_basis

    basis_id = load_basis(p["basis"]).basis_id
    run_dir = os.path.join(os.path.abspath(args.work), "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "dump"))
    shutil.rmtree(p["basis_dir"], ignore_errors=True)  # only our basis file, no cache entries
    os.makedirs(p["basis_dir"])
    basis_in_place = os.path.join(p["basis_dir"], basis_id + ".safetensors")

    forge = Forge(p, run_dir, args.port)
    gens: dict = {"basis_id": basis_id}
    timings = {}
    try:
        timings["api_up_s"] = round(forge.start(), 1)
        log(f"Forge API up in {timings['api_up_s']} s")
        for i, (label, suffix, with_basis) in enumerate(GENERATIONS, start=1):
            if with_basis and not os.path.isfile(basis_in_place):
                shutil.copyfile(p["basis"], basis_in_place)
            if not with_basis and os.path.isfile(basis_in_place):
                os.remove(basis_in_place)
            before = len(forge.console())
            out, seconds = forge.txt2img(PROMPT + suffix)
            forge.memory()
            time.sleep(1)  # the console is written by the same process; let it flush
            console = forge.console()[before:]
            gens[label] = {"seconds": round(seconds, 1), "console": console, "info": out.get("info", "")}
            with open(os.path.join(run_dir, f"gen{i:02d}-{label}.png"), "wb") as f:
                f.write(base64.b64decode(out["images"][0]))
            log(f"generation {i} ({label}): {seconds:.1f} s, peak RSS so far {forge.peak_kib / 2**20:.2f} GiB")
    except (urllib.error.URLError, OSError, KeyError) as e:  # a failed request: say how far it got
        forge.stop()
        done = [k for k in gens if isinstance(gens[k], dict)]
        print(f"FAIL forge: {type(e).__name__}: {e} after generations {done}; see {forge.log_path}")
        return 1
    finally:
        forge.stop()
    results, worst, rows_report = compare(p, os.path.join(run_dir, "dump"), gens)
    for name, ok, evidence in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {evidence}")
    summary = {"timings_s": timings, "generations_s": {k: v["seconds"] for k, v in gens.items() if isinstance(v, dict)},
               "peak_vmhwm_gib": round(forge.peak_kib / 2**20, 2), "worst": worst, "basis_id": basis_id,
               "results": [{"check": n, "pass": ok, "evidence": e} for n, ok, e in results], "slices": rows_report}
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("| check | result | evidence |\n|---|---|---|\n")
        for name, ok, evidence in results:
            f.write(f"| {name} | {'pass' if ok else '**FAIL**'} | {evidence} |\n")
    print(f"API up {timings['api_up_s']} s; generations {summary['generations_s']}; peak VmHWM {summary['peak_vmhwm_gib']} GiB")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
