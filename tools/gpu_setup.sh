#!/usr/bin/env bash
# Set up a GPU machine that has CUDA PyTorch but no network (e.g. a CUDA image with torch 2.11 + CUDA 13,
# Triton and transformers, without megatron-core or fla), by carrying wheels into it.
#
#   tools/gpu_setup.sh download   # on a machine that reaches PyPI: Python 3.12 x86_64 wheels into .whl/, checked
#   tools/gpu_setup.sh check      # .whl/ holds each package below once, for Python 3.12 x86_64, <= 64 MiB in all
#   tools/gpu_setup.sh install    # on the GPU machine, in the repo root: check, then .whl/ and this tree into $SITE
#   export PYTHONPATH=/tmp/site   # in the same shell, before running anything (install prints it)
#   tools/gpu_setup.sh packages   # the pinned list, one NAME==VERSION a line
#
# WHEEL_DIR (default .whl), SITE (default /tmp/site) and PYTHON (default python3) override the defaults.
# .whl/ is kept out of git through .git/info/exclude (download adds the line), so a copy of the tracked tree
# leaves it behind: carry it explicitly. It holds only what the image lacks: megatron-core (CI's Python 3.12 leg's),
# flash-linear-attention + fla-core, webdataset + braceexpand, and pytest with the libraries and plugin it loads
# (tools/gpu_check.sh runs them with plugin autoloading off, so the image's own pytest plugins never load).
# The project itself is installed from the working tree at install time, so it is never a stale copy.
#
# Transformer Engine is left out: every transformer-engine-torch release on PyPI (the PyTorch extension that
# megatron-core's TE spec needs) is a source distribution that compiles against torch and CUDA, and the
# CUDA 13 core wheel alone (transformer-engine-cu13 2.11.0) is 179 MB. Without it the model uses
# megatron-core's local linears and norms (models/specs.py: te_available() is False). Where a network and a
# compiler are at hand: pip install --no-build-isolation "transformer-engine[pytorch,core_cu13]>=2.9,<2.12".
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
PACKAGES=(
    megatron-core==0.19.2
    flash-linear-attention==0.6.0
    fla-core==0.6.0
    webdataset==1.0.2
    braceexpand==0.1.7
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    packaging==26.4
    pygments==2.21.0
    pytest-timeout==2.4.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done

check() {
    "$PYTHON" tools/gpu_check.py wheels --dir "$WHEEL_DIR" "${PLATFORM_ARGS[@]}" "${PACKAGES[@]}"
}

download() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
    mkdir -p "$(dirname "$exclude")" "$WHEEL_DIR"
    grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    rm -f "$WHEEL_DIR"/*.whl  # one version of each: two would stop the install
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORM_ARGS[@]}" -d "$WHEEL_DIR" "${PACKAGES[@]}"
    ls -l "$WHEEL_DIR"
    check
}

install() {
    check
    local pip=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-cache-dir --upgrade --target "$SITE")
    "${pip[@]}" --no-compile "$WHEEL_DIR"/*.whl
    # The project from this tree: setup.py maps kernels/ to megatron_refine.kernels, so PYTHONPATH=. is not enough.
    "${pip[@]}" --no-build-isolation .
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # -P: not the current directory first, whose megatron_refine/ lacks kernels/ and would shadow the install.
    "$PYTHON" -P - <<'EOF'
import torch
import fla
import megatron.core
import megatron_refine
from megatron_refine.kernels import fla_available

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {megatron.core.__version__}, "
      f"fla {fla.__version__}, megatron_refine from {megatron_refine.__path__[0]}")
print(f"GPU: {torch.cuda.get_device_name() if cuda else 'none visible to torch'}")
print(f"fla Triton kernels usable: {cuda and fla_available(torch.empty(1, device='cuda', dtype=torch.bfloat16))}")
try:
    from megatron.core.extensions.transformer_engine import HAVE_TE
except Exception:  # noqa: BLE001 - a TE that fails to load counts as absent
    HAVE_TE = False
print(f"Transformer Engine: {'yes' if HAVE_TE else 'no (local linears)'}")
EOF
    nvidia-smi || echo "nvidia-smi not found: is this the GPU machine?" >&2
    echo "ready: export PYTHONPATH=$PYTHONPATH"
}

case "${1:-}" in
    download) download ;;
    check) check ;;
    install) install ;;
    packages) printf '%s\n' "${PACKAGES[@]}" ;;
    *) echo "usage: $0 download|check|install|packages  (download where PyPI is reachable, install on the GPU machine)" >&2
       exit 2 ;;
esac
