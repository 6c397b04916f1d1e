#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md on one device, each step's log in a folder:
#
#     bash scripts/bench_all.sh cuda runs/bench_h100     # the GPU tests first, then the benchmarks
#     bash scripts/bench_all.sh cpu runs/bench_cpu
#
# MAP (default ../shared/data/maps/aspire_70S/clean70SRibosome_vol_65p.mrc) is the map of the
# class3d benchmark set; PYTHON (default .venv/bin/python where it exists, else python3) the
# interpreter. Each step prints its last lines and wall time; a failing step does not stop the
# others, and the exit status counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:?usage: bash scripts/bench_all.sh cpu|cuda OUTPUT_FOLDER}
out=${2:?usage: bash scripts/bench_all.sh cpu|cuda OUTPUT_FOLDER}
map=${MAP:-../shared/data/maps/aspire_70S/clean70SRibosome_vol_65p.mrc}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "$device" != cpu && "$device" != cuda ]]; then
    echo "device must be cpu or cuda, not $device" >&2
    exit 2
fi
if [[ ! -f "$map" ]]; then
    echo "no map at $map: set MAP to the 70S ribosome map of ../shared/data/maps/aspire_70S" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {
    local name=$1
    shift
    echo "=== $name"
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local status=$?
    tail -n 12 "$out/$name.log"
    echo "--- $name: exit $status, $((SECONDS - start)) s"
    if ((status != 0)); then failed=$((failed + 1)); fi
}

if [[ "$device" == cuda ]]; then
    step gpu_tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
fi
step bench_estep "$PYTHON" scripts/bench_estep.py --device "$device" --box 64 --order 2 --classes 3
# as many slices as docs/benchmarks.md: on a CPU the reference, torch-fourier-slice, peaks at
# 20 GiB resident with 1,000 slices at box 128 (cryotorch at 2.2 GiB), and 2,000 ran the 24 GiB
# of the 2-core VM out of memory
slices=1000
if [[ "$device" == cuda ]]; then slices=2000; fi
step bench_ops "$PYTHON" scripts/bench_ops.py --device "$device" --boxes 64 128 --n-slices "$slices"
step bench_class3d "$PYTHON" scripts/bench_class3d.py --map "$map" --particles 4000 --snr 0.05 --iterations 25 \
    --modes noalign align --workdir "$out/class3d" \
    --class3d-overrides sampling.final_local_iterations=5 "compute.accelerator=$device"
step bench_online "$PYTHON" scripts/bench_class3d_online.py speed --device "$device"
exit "$failed"
