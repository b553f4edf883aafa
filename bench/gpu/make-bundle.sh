#!/usr/bin/env bash
# Builds .whl/ in the repository root: everything a GPU machine needs to run bench/gpu_session.sh
# besides the repository itself. The machines' image has CUDA, torch, transformers and peft but no
# Ray, DeepSpeed, pydantic or MLflow, and no package index. This downloads, from the package index
# this machine uses (it needs one):
#   .whl/*.whl        the pinned wheels of bench/gpu/requirements.txt (CPython 3.12, x86_64), and
#                     DeepSpeed built here as a pure wheel (it ships only a source archive; no ops are
#                     prebuilt: they compile just in time on the GPU machine, which has nvcc and ninja)
#   .whl/extra/*.whl  the reference optimizers of bench/gpu/references.txt (test oracles)
#   .whl/install.sh   a copy of bench/gpu/install.sh
# The Ray wheel is repacked without its Java jars (only Java workers use them), which keeps the
# folder near 57 MB, under the 64 MiB that the device tool carries.
#
# Usage (any machine with python3 -m pip, zip and unzip; torch is not needed):
#   bash bench/gpu/make-bundle.sh
# then carry .whl to the GPU machine and, from the repository root there:
#   bash bench/gpu_session.sh PHASE...      (or: source .whl/install.sh, then any bench command)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
DS=${DEEPSPEED_VERSION:-0.19.8}
out=.whl
mkdir -p "$out/extra"
# start from the pinned set only (a wheel left from another version would be installed too);
# DeepSpeed's wheel of the pinned version is kept, its build takes a while
find "$out" -maxdepth 2 -type f -name '*.whl' ! -name "deepspeed-$DS-*" -delete
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${plat[@]}" "$@"; }
dl -d "$out" -r bench/gpu/requirements.txt
dl -d "$out/extra" -r bench/gpu/references.txt
if ! ls "$out"/deepspeed-"$DS"-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$DS"
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$out" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
for w in "$out"/ray-*.whl; do
  if unzip -Z1 "$w" 'ray/jars/*' >/dev/null 2>&1; then
    zip -q -d "$w" 'ray/jars/*'
  fi
done
python3 "$here/check_bundle.py" "$out"
cp bench/gpu/install.sh "$out/install.sh"
du -ch "$out"/*.whl "$out"/extra/*.whl | tail -n 1
