#!/usr/bin/env bash
# Build the wheels that benchmarks/gpu_acceptance.py installs offline on a GPU machine whose image lacks them:
# hydra-core, omegaconf, antlr4-python3-runtime (4.9.3, which hydra pins and which PyPI has only as an sdist:
# built here) and submitit. Run it where PyPI is reachable, from any directory:
#
#     bash benchmarks/build_gpu_wheels.sh            # -> .wheels/ in the repository root (ignored by git)
#     bash benchmarks/build_gpu_wheels.sh DIR        # -> DIR
#
# Versions: those installed in this environment (what CI tests), else the defaults below; override with
# HYDRA_VERSION, OMEGACONF_VERSION, SUBMITIT_VERSION. Dependencies are left out (--no-deps): PyYAML, packaging,
# cloudpickle and typing_extensions are on the GPU image. Every wheel must be pure Python (py3-none-any), so the
# Python here need not be the GPU machine's 3.12. With a Python 3.12 at hand (PYTHON312, or python3.12 on the
# PATH) the wheels are also installed into a scratch folder with it and imported.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.wheels}"
python="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

installed() {  # installed version of a distribution, or the default given
    "$python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}
hydra="${HYDRA_VERSION:-$(installed hydra-core 1.3.2)}"
omegaconf="${OMEGACONF_VERSION:-$(installed omegaconf 2.3.0)}"
submitit="${SUBMITIT_VERSION:-$(installed submitit 1.5.2)}"
antlr=4.9.3

rm -rf "$out"
mkdir -p "$out"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --dest "$out" \
    "hydra-core==$hydra" "omegaconf==$omegaconf" "submitit==$submitit"
# No wheel on PyPI: build it from the sdist (no cached wheel, so it really is built here).
"$python" -m pip wheel --quiet --no-deps --no-binary=:all: --no-cache-dir --wheel-dir "$out" "antlr4-python3-runtime==$antlr"

status=0
for wheel in "$out"/*.whl; do
    case "$(basename "$wheel")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
        *) echo "build_gpu_wheels: $(basename "$wheel") is not a pure-Python wheel" >&2; status=1 ;;
    esac
done
count=$(ls "$out"/*.whl | wc -l)
if [ "$count" -ne 4 ]; then
    echo "build_gpu_wheels: expected 4 wheels in $out, found $count" >&2
    status=1
fi
[ "$status" -eq 0 ] || exit "$status"

python312="${PYTHON312:-$(command -v python3.12 || true)}"
if [ -n "$python312" ] && "$python312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    "$python312" -m pip install --quiet --no-index --no-deps --target "$scratch/site" "$out"/*.whl
    # Their own dependencies, as the GPU image has them (for this check only, not carried).
    "$python312" -m pip install --quiet --target "$scratch/deps" pyyaml packaging cloudpickle typing_extensions
    PYTHONPATH="$scratch/site:$scratch/deps" "$python312" -c "
import sys, antlr4, hydra, omegaconf, submitit
from hydra import compose, initialize
assert all(m.__file__.startswith('$scratch/site') for m in (antlr4, hydra, omegaconf, submitit))
print('build_gpu_wheels: the wheels install and import on Python', sys.version.split()[0])"
else
    echo "build_gpu_wheels: no Python 3.12 found (set PYTHON312): the wheels were not test-installed on 3.12"
fi
ls -l "$out"
