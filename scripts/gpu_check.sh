#!/usr/bin/env bash
# The GPU check (issue 18): the project's figures on one GPU in one command, within 8 minutes.
# On the device machine (its own python3 with jax/torch; nothing installed but the wheels
# carried in .whl/, put on PYTHONPATH with the source tree):
#   bash scripts/gpu_check.sh            figures and logs under $OUT (else ./gpu-check-out)
#   bash scripts/gpu_check.sh DIR        ... under DIR
# Here, on CPU with toy sizes (the test suite runs it so that it cannot rot):
#   bash scripts/gpu_check.sh DIR --dry-run      (or GPU_CHECK_DRY_RUN=1)
# See benchmarks/gpu_check.py for what it measures; bash scripts/gpu_wheels.sh fetches the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dry=0
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry=1; fi
done
if [ "${GPU_CHECK_DRY_RUN:-0}" != "0" ]; then dry=1; fi
if [ "$dry" = 1 ]; then
  py=${PYTHON:-.venv/bin/python}
  [ -x "$py" ] || py=python3
else
  py=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" > /dev/null; then
    site=${GPU_CHECK_SITE:-/tmp/ap_xla_site}
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || { echo "gpu_check: installing the carried wheels (.whl/) failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: no wheels in .whl/ (bash scripts/gpu_wheels.sh fetches them); using what is installed" >&2
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=$(command -v "$py")
exec "$py" benchmarks/gpu_check.py --python "$py" "$@"
