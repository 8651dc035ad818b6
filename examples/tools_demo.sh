#!/usr/bin/env bash
# A walk through the qrlora tools on the tiny built-in SDXL (random weights, nothing downloaded).
# Runs under the README's install (pip install -e '.[trainer]'); with matplotlib it also plots.
# The two ΔR files are random stand-ins (examples/make_example_delta_r.py), not trained ones:
# they show what each tool reads and writes; `python -m trainer --config examples/demo.toml`
# trains a real one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../out/tools_demo}"
mkdir -p "$out"
export QRLORA_CACHE="$out/cache"

echo "== a tiny SDXL checkpoint in the SGM layout A1111 and Forge load"
qrlora make-tiny --arch sdxl -o "$out/tiny"
qrlora inspect "$out/tiny/tiny-sdxl.safetensors"

echo "== its basis at rank 8 on kohya's SDXL layer set (computed once, then a cache hit)"
qrlora basis "$out/tiny/tiny-sdxl.safetensors" --rank 8 -o "$out/basis-r8.safetensors" --cache "$QRLORA_CACHE/basis"
qrlora basis "$out/tiny/tiny-sdxl.safetensors" --rank 8 -o "$out/basis-r8.safetensors" --cache "$QRLORA_CACHE/basis"

echo "== two ΔR files on that basis (random stand-ins)"
python "$here/make_example_delta_r.py" "$out/basis-r8.safetensors" "$out/dog.safetensors" --seed 1
python "$here/make_example_delta_r.py" "$out/basis-r8.safetensors" "$out/watercolor.safetensors" --seed 2
qrlora inspect "$out/dog.safetensors"

echo "== fuse, export, compare"
qrlora fuse "$out/dog.safetensors:1.0" "$out/watercolor.safetensors:0.8" -o "$out/dog_watercolor.safetensors"
qrlora export "$out/dog_watercolor.safetensors" --to kohya --basis "$out/basis-r8.safetensors" -o "$out/dog_watercolor_lora.safetensors"
qrlora inspect "$out/dog_watercolor_lora.safetensors"
plot=()
if python -c "import matplotlib" 2>/dev/null; then plot=(--plot "$out/similarity.png"); fi
qrlora similarity "$out/dog.safetensors" "$out/watercolor.safetensors" --json "$out/similarity.json" "${plot[@]}"
# a ΔR file against a LoRA: compared through ΔW, with the ΔR file's basis
qrlora similarity "$out/dog.safetensors" "$out/dog_watercolor_lora.safetensors" --basis "$out/basis-r8.safetensors"
echo "== done: files in $out"
