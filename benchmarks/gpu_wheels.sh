#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without internet (the device machines: Python 3.12 with
# CUDA torch, transformers 5.17, no tyro, deepspeed, open_clip, lpips or webdataset). Run here, where PyPI is
# reachable; it writes .whl/ (git-ignored, about 30 MB) with the versions of this checkout's .venv, the ones
# the tests passed with. On the GPU machine, carry .whl: gpu_check.sh installs it into a private folder first.
#   bash benchmarks/gpu_wheels.sh            then, there:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# What the image lacks, or may hold below these packages' floors (its transformers 5.17, huggingface_hub 1.33;
# timm, click, regex, anyio, idna unknown); torch, numpy, tokenizers 0.23, safetensors 0.8, pillow, psutil,
# ninja, msgpack, einops and sentencepiece are there.
PKGS=(tyro docstring-parser typeguard typing-extensions hjson pydantic pydantic-core annotated-types
      typing-inspection py-cpuinfo transformers huggingface-hub httpx2 httpcore2 truststore anyio idna h11 hf-xet
      kernels tomlkit click typer regex open-clip-torch ftfy wcwidth timm lpips webdataset braceexpand)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
for p in "${PKGS[@]}"; do specs+=("$p==$(version "$p")"); done
rm -rf .whl.tmp && mkdir .whl.tmp
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl.tmp "${specs[@]}"
# deepspeed is an sdist on PyPI: built here, without its compiled ops (JIT-built there when needed)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl.tmp "deepspeed==$(version deepspeed)"
rm -rf .whl && mv .whl.tmp .whl
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (carry it: the device tool's carry=['.whl'])"
