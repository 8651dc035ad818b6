#!/usr/bin/env bash
# A walk through the qrlora tools on the tiny built-in SDXL (random weights, nothing downloaded).
# Until the trainer lands (issue 3), the two "trained" ΔR files are made by
# examples/make_example_delta_r.py from random ΔR: they show the tools, not a training result.
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

echo "== two ΔR files on that basis (stand-ins for trained ones)"
python "$here/make_example_delta_r.py" "$out/basis-r8.safetensors" "$out/dog.safetensors" --seed 1
python "$here/make_example_delta_r.py" "$out/basis-r8.safetensors" "$out/watercolor.safetensors" --seed 2
qrlora inspect "$out/dog.safetensors"

echo "== fuse, compare, export"
qrlora fuse "$out/dog.safetensors:1.0" "$out/watercolor.safetensors:0.8" -o "$out/dog_watercolor.safetensors"
qrlora similarity "$out/dog.safetensors" "$out/watercolor.safetensors" --json "$out/similarity.json" --plot "$out/similarity.png"
qrlora export "$out/dog_watercolor.safetensors" --to kohya --basis "$out/basis-r8.safetensors" -o "$out/dog_watercolor_lora.safetensors"
qrlora inspect "$out/dog_watercolor_lora.safetensors"
echo "== done: files in $out"
