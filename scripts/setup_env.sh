#!/usr/bin/env bash
# Create (or reuse) the bundle's virtual environment at .venv with the pinned packages.
# Idempotent and fast when nothing changed: a stamp keyed on the requirement files short-circuits it.
#   bash scripts/setup_env.sh          # runtime packages
#   bash scripts/setup_env.sh --dev    # + pytest and ruff
# Environment: PYTHON (interpreter for the venv, default python3), SIAM3D_VENV (venv path, default .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SIAM3D_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
reqs=("$root/requirements.txt")
[[ "${1:-}" == "--dev" ]] && reqs+=("$root/requirements-dev.txt")
key=$(cat "${reqs[@]}" | sha256sum | cut -c1-16)
stamp="$venv/.siam3d-installed-$key"
if [[ -f "$stamp" ]]; then
    echo "environment up to date: $venv"
    exit 0
fi
start=$(date +%s)
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# --no-compile + one parallel compileall below: pip byte-compiles every file on one core (~50 s of a fresh setup);
# compileall -j 0 uses every core and skips the packages' own test folders, which nothing imports (~15 s on 2 cores).
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)
# torch first and pinned: an unpinned torch (or one pulled in by another package) drags in CUDA wheels.
"${pip[@]}" torch==2.13.0 numpy==2.4.6 versioneer==0.29
for r in "${reqs[@]}"; do "${pip[@]}" -r "$r"; done
# pyradiomics 3.0.1's sdist needs numpy + versioneer at build time and breaks under build isolation.
"${pip[@]}" --no-build-isolation pyradiomics==3.0.1
# Compile errors (a few packages ship files for other Python versions) are not fatal, as under pip's own compile.
"$venv/bin/python" -m compileall -qq -j 0 -x 'site-packages/.*/tests?/' "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
"$venv/bin/python" -c "import torch, monai, ignite, radiomics, sklearn; print('torch', torch.__version__, '| monai', monai.__version__, '| pyradiomics', radiomics.__version__)"
touch "$stamp"
echo "environment ready in $(( $(date +%s) - start )) s: $venv"
