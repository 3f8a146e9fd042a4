#!/usr/bin/env bash
# Every GPU measurement of this project in one call on a lent H100/H200 (no internet there).
#
# Here, once (needs the package registry): the GPU image has torch but not diffusers
#     bash benchmarks/gpu_check.sh --fetch-wheels      # -> .whl/ (git-ignored, about 6 MB)
# There, with .whl/ copied along and a wall-clock limit of about 9 minutes:
#     OUT=gpu-results bash benchmarks/gpu_check.sh
# Results land in $OUT, or reports/benchmarks/ without it:
# device_checks.json holds correctness checks on the GPU, gpu-key.json the issue's target
# rows, gpu-ensemble.json the ensemble rows (compared with gpu-key.json's member rows),
# gpu-rest.json the remaining switches, rehearsal.json (+ rehearsal/ with each editor's
# reports and figures) the pipeline rehearsal's per-stage seconds and peak GPU memory. Every JSON
# is rewritten after each row or stage; DEADLINE (seconds, default 420) stops new rows in time
# (ENSEMBLE seconds of it, default 75, are kept for the ensemble rows), TOTAL (default 520)
# bounds the whole call (the scale-out step gets what is left).
# A dry run of the plumbing here: DEVICE=cpu DEADLINE=20 PYTHON=.venv/bin/python OUT=/tmp/gc bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata spandrel==0.4.2 spandrel-extra-arches==0.2.0 \
        accelerate==1.15.0 psutil
    ls -l .whl
    exit
fi

out=${OUT:-reports/benchmarks}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
deadline=${DEADLINE:-420}
device=${DEVICE:-cuda}
start=$SECONDS
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi

# 0. correctness on the device: the test suite's key comparisons (seconds; at most 2 minutes)
timeout -k 10 120 "$py" benchmarks/device_checks.py --device "$device" \
    --out "$out/device_checks.json" 2>&1 | tee "$out/device_checks.log"

# 1. the paper's path, stage by stage, on Big-LaMa and SD-1.5 with random weights (1-3 minutes;
#    no new stage after REHEARSAL seconds, killed 60 s later); the CPU dry run is tiny
rehearsal=${REHEARSAL:-210}
[[ "$device" == cpu ]] && dry=(--dry-run) || dry=()
timeout -k 10 $((rehearsal + 60)) "$py" benchmarks/rehearse_pipeline.py --device "$device" \
    "${dry[@]}" --deadline "$rehearsal" --out "$out/rehearsal.json" --keep "$out/rehearsal" 2>&1 |
    tee "$out/rehearsal.log"

# 2. the issue's targets, in one run so that the PhotoGuard ratio comes from the same harness;
#    ENSEMBLE seconds of the deadline are left for step 2b
ensemble=${ENSEMBLE:-75}
left=$((deadline - ensemble - (SECONDS - start)))
left=$((left > 0 ? left : 0))
timeout -k 10 $((left + 90)) "$py" benchmarks/benchmark_protection.py --device "$device" \
    --repeats 2 --max-seconds-per-case 20 --deadline-seconds "$left" --out "$out/gpu-key.json" --cases \
    big-lama-512 big-lama-512-bf16 mat-512 mat-512-bf16 sd15-512-s4-bf16 sd15-512-s4-bf16-ckpt \
    photoguard-sd15-512-s4-bf16 sd15-512-s4 sd15-512-s4-ckpt 2>&1 | tee "$out/gpu-key.log"

# 2b. ensembles (issue 23): one implant call against Big-LaMa + MAT (fp32) and Big-LaMa + MAT +
#     SD-1.5 4-step (bf16; estimated at most 67 GiB in fp32), one image at 512 px; seconds and peak
#     GPU memory against their members' rows in gpu-key.json (time / sum, memory / largest)
left=$((deadline - (SECONDS - start)))
if ((left > 30)); then
    timeout -k 10 $((left + 60)) "$py" benchmarks/benchmark_protection.py --device "$device" \
        --repeats 1 --max-seconds-per-case 15 --deadline-seconds "$left" \
        --out "$out/gpu-ensemble.json" --compare-with "$out/gpu-key.json" \
        --cases ensemble-big-lama+mat-512 ensemble-big-lama+mat+sd15-512-s4-bf16 2>&1 |
        tee "$out/gpu-ensemble.log"
fi

# 3. every other row of the gpu group, in the time left
left=$((deadline - (SECONDS - start)))
if ((left > 30)); then
    timeout -k 10 $((left + 60)) "$py" benchmarks/benchmark_protection.py --device "$device" --repeats 2 \
        --max-seconds-per-case 15 --deadline-seconds "$left" --out "$out/gpu-rest.json" \
        --cases mini-128 mini-256 big-lama-256 big-lama-512-unfolded big-lama-512-separate \
        'big-lama-512*channels-last' big-lama-512-bf16-compile 'sd15-512-s[12]-bf16*' \
        sd15-512-s4-bf16-separate photoguard-sd15-512-s4 mat-512-separate 2>&1 | tee "$out/gpu-rest.log"
fi

# 4. scale-out (README "Many images, many GPUs"): images per second of `protect FOLDER` for
#    24 images at 512 px, Big-LaMa with random weights, 1 / 2 / 4 processes (accelerate launch)
#    sharing the GPU(s) -> gpu-scaleout.json. GPU only (the CPU rows come from running
#    benchmark_scaleout.py directly); its own budget: SCALEOUT seconds (default 150; 0 skips
#    it); needs accelerate (in .whl/ after --fetch-wheels, or installed).
#    The whole call stays under TOTAL seconds (default 520, inside a 9-minute slot): the
#    scale-out gets what is left of it, and is skipped with under 30 s.
scaleout=${SCALEOUT:-150}
total=${TOTAL:-520}
left_total=$((total - (SECONDS - start)))
((left_total < scaleout)) && scaleout=$left_total
if [[ "$device" != cpu ]] && ((scaleout < 30)); then
    echo "scale-out step skipped: ${scaleout} s left of TOTAL=${total}" | tee "$out/gpu-scaleout.log"
elif [[ "$device" != cpu ]] && ((scaleout > 0)); then
    if "$py" -c "import accelerate" 2>/dev/null; then
        timeout -k 10 "$scaleout" "$py" benchmarks/benchmark_scaleout.py --device "$device" \
            --random-big-lama --images 24 --size 512 --expand 17 --rows 1x4 2x4 4x2 \
            --out "$out/gpu-scaleout.json" 2>&1 | tee "$out/gpu-scaleout.log"
    else
        echo "scale-out step skipped: accelerate is not installed" | tee "$out/gpu-scaleout.log"
    fi
fi
echo "gpu_check: $((SECONDS - start)) s"
