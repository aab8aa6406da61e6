#!/usr/bin/env bash
# normlab on a GPU in one command: install normlab into this machine's python3 without a package
# registry, then run scripts/gpu_check.py (its --help and benchmarks/gpu/README.md say what it
# does and writes). Arguments go to gpu_check.py, e.g.:
#   scripts/gpu-check.sh                           # CUDA, 8 minutes (--minutes), results in $OUT or ./gpu-check-out
#   scripts/gpu-check.sh --device cpu --small      # the small form on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# normlab's dependencies (torch, numpy, pyyaml, tqdm, matplotlib, scipy) must be there already.
if "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/normlab-install.log 2>&1; then
    export GPU_CHECK_INSTALL="pip install --no-deps --no-build-isolation -e ."
else
    echo "pip could not install normlab (see /tmp/normlab-install.log); using PYTHONPATH=src" >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_CHECK_INSTALL="PYTHONPATH=src (pip failed: $(tail -1 /tmp/normlab-install.log))"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
