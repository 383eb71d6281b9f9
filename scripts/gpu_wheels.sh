#!/usr/bin/env bash
# Downloads the wheels the GPU check carries (scripts/gpu_wheels.txt) into .whl/, for the GPU
# machine's Python 3.12 on x86-64 (nothing can be downloaded there). .whl/ is ignored by git
# and travels with the working tree when the device call names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p .whl
reqs=$(grep -v '^\s*#' scripts/gpu_wheels.txt | grep -v '^\s*$')
for req in $reqs; do
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$req"
done
# One version of each: two of the same package stop the install on the device machine.
names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort)
if [ -n "$(echo "$names" | uniq -d)" ]; then
  echo "gpu_wheels: several versions of $(echo "$names" | uniq -d | tr '\n' ' ')in .whl/; remove the old ones" >&2
  exit 1
fi
ls -l .whl/
du -sh .whl/
