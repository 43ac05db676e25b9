#!/usr/bin/env bash
# Fresh-environment setup time, pip's own byte-compilation against scripts/setup_env.sh's (pip --no-compile, then
# one parallel compileall that skips the packages' test folders), in one run, phase by phase.
#   bash benchmarks/setup_time.sh [OUT_JSON]     (default benchmarks/results/setup_time.json)
# Each mode builds a new venv in a temporary folder with pip's cache off (PIP_NO_CACHE_DIR=1), as on a fresh
# machine, installs what scripts/setup_env.sh installs, then times two imports of the stack (the first one shows
# whether the bytecode is there). Modes run in the order pip, parallel, parallel, pip, so that a drifting machine
# load favours neither. About 5 minutes on 2 cores; needs the package registry.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    echo "usage: bash benchmarks/setup_time.sh [OUT_JSON]" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/benchmarks/results/setup_time.json}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_NO_CACHE_DIR=1
rows=()
now() { date +%s.%N; }
run_mode() {
    local mode=$1 venv="$work/venv_$1_$2" t=()
    t+=("$(now)")
    "$python" -m venv "$venv"
    t+=("$(now)")
    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    [[ $mode == parallel ]] && pip+=(--no-compile)
    "${pip[@]}" torch==2.13.0 numpy==2.4.6 versioneer==0.29
    "${pip[@]}" -r "$root/requirements.txt"
    "${pip[@]}" --no-build-isolation pyradiomics==3.0.1
    t+=("$(now)")
    if [[ $mode == parallel ]]; then
        "$venv/bin/python" -m compileall -qq -j 0 -x 'site-packages/.*/tests?/' "$venv/lib" || true
    fi
    t+=("$(now)")
    "$venv/bin/python" -c "import torch, monai, ignite, radiomics, sklearn"
    t+=("$(now)")
    "$venv/bin/python" -c "import torch, monai, ignite, radiomics, sklearn"
    t+=("$(now)")
    rows+=("{\"mode\": \"$mode\", \"t\": [$(IFS=,; echo "${t[*]}")]}")
    echo "$mode: done"
    rm -rf "$venv"
}
i=0
for mode in pip parallel parallel pip; do
    run_mode "$mode" "$i"
    i=$((i + 1))
done
mkdir -p "$(dirname "$out")"
joined=$(IFS=,; echo "${rows[*]}")
"$python" - "$out" "$joined" <<'PY'
import json, os, statistics, sys, tempfile
out, raw = sys.argv[1], json.loads("[" + sys.argv[2] + "]")
names = ["venv_s", "pip_s", "compileall_s", "first_import_s", "second_import_s"]
rows = []
for r in raw:
    t = r["t"]
    row = {"mode": r["mode"], **{n: round(b - a, 1) for n, a, b in zip(names, t, t[1:])}}
    row["setup_s"] = round(t[3] - t[0], 1)
    rows.append(row)
    print(f"{row['mode']}: setup {row['setup_s']} s (pip {row['pip_s']}, compileall {row['compileall_s']}), "
          f"first import {row['first_import_s']} s")
summary = {m: {k: round(statistics.mean(r[k] for r in rows if r["mode"] == m), 1) for k in rows[0] if k != "mode"}
           for m in ("pip", "parallel")}
doc = {"benchmark": "setup_time", "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
       "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""), "runs": rows, "mean": summary,
       "setup_ratio_parallel_over_pip": round(summary["parallel"]["setup_s"] / summary["pip"]["setup_s"], 3)}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)))
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=1)
umask = os.umask(0); os.umask(umask); os.chmod(tmp, 0o666 & ~umask)
os.replace(tmp, out)
print(json.dumps(doc["mean"]), "parallel/pip setup", doc["setup_ratio_parallel_over_pip"], "->", out)
PY
