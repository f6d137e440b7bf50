#!/usr/bin/env bash
# Every GPU figure that issues 4 and 6 ask for, collected in one call on a lent GPU machine (H100 / H200 with
# torch, triton, torchvision, pytest-benchmark, nvcc and cmake; no network). From the repository root, through
# the device tool:
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devcarry/whl", ".devcarry/lungmask"], timeout_s=600)
#
# .devcarry/whl holds the cp312 wheels the machine lacks: connected-components-3d, isal, nibabel, pydicom,
# pylibjpeg, pylibjpeg-libjpeg (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`, see the
# device tool's README). .devcarry/lungmask holds lungmask/resunet.py taken from lungmask's wheel (for
# benchmarks/lungmask_unet_gpu.py). Steps run under time limits so that the call ends inside the tool's 10
# minutes; after each step everything so far is packed into $OUT/gpu_session.tar.gz, so a cut-off call still
# returns what it measured. Steps that fail are logged and the next step still runs.
# STEPS (a space-separated list, default all but profile) picks steps: build tests e2e lungmask folder ops profile
# (profile: cProfile and torch.profiler tables of one warm run on the timing volume, where a stage's time goes). E2E_CONFIGS
# (comma-separated "engine precision [more benchmark options, e.g. --no-ensemble or --batch-size 8]"), FOLDER_VOLUMES (default 16) and FOLDER_WORKERS (default "1 auto") narrow the e2e and folder steps.
set -uo pipefail
OUT=${OUT:-/tmp/covfast-gpu-session}
STEPS=${STEPS:-"build tests e2e lungmask folder ops"}
WORK=$(mktemp -d)
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$WORK/session.log"; }
pack() { tar -czf "$OUT/gpu_session.tar.gz" -C "$WORK" --exclude='*.nii.gz' --exclude=folder . ; cp "$WORK/session.log" "$OUT/"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
tests_rc=0

log "install"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl >"$WORK/install.log" 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ceditable.mode=redirect \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" >>"$WORK/install.log" 2>&1 || log "build failed (install.log)"
log "build took $(( $(date +%s) - start )) s"
{ nvidia-smi; python3 -m covfast info; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)";
  nproc; free -g; } >"$WORK/machine.txt" 2>&1
pack

if want tests; then
    log "CUDA-marked tests"
    timeout 150 python3 -m pytest -q -m cuda tests >"$WORK/cuda_tests.log" 2>&1
    tests_rc=$?
    tail -n 3 "$WORK/cuda_tests.log" | tee -a "$WORK/session.log"
    pack
fi

VOL="$WORK/p001_size.nii.gz"
if want e2e || want lungmask || want folder || want profile; then
    python3 benchmarks/make_timing_volume.py "$VOL" >>"$WORK/session.log" 2>&1 || log "timing volume failed"
fi

if want e2e; then
    log "end to end on a P001-sized volume"
    # "torch fp16 --batch-size 8" is the batch size the GPU ran before the default became 32 (session 20).
    IFS=, read -ra configs <<<"${E2E_CONFIGS:-torch fp16,torch fp16 --batch-size 8,torch fp32,onnx fp32,torch fp16 --no-ensemble}"
    for config in "${configs[@]}"; do
        set -- $config
        extra="${*:3}"
        name="e2e_cuda_${1}_${2}"
        [[ -n "$extra" ]] && name+="_$(echo "$extra" | tr -cs 'a-z0-9' '_' | sed 's/^_*//; s/_*$//')"
        timeout 120 python3 -m covfast benchmark "$VOL" --device cuda --engine "$1" --precision "$2" $extra --runs 5 \
            --json "$WORK/$name.json" >"$WORK/$name.txt" 2>&1 || log "$name failed"
        grep -E "end_to_end|peak" "$WORK/$name.txt" | tr '\n' ' ' | sed "s/^/$name: /" | tee -a "$WORK/session.log"; echo
        pack
    done
fi

if want lungmask; then
    log "lungmask's U-Net on the same volume and GPU"
    timeout 120 python3 benchmarks/lungmask_unet_gpu.py "$VOL" --resunet .devcarry/lungmask/resunet.py --runs 5 \
        --json "$WORK/lungmask_unet_cuda.json" >"$WORK/lungmask_unet_cuda.txt" 2>&1 || log "lungmask timing failed"
    grep median "$WORK/lungmask_unet_cuda.txt" | tee -a "$WORK/session.log"
    pack
fi

if want folder; then
    n=${FOLDER_VOLUMES:-16}
    mkdir -p "$WORK/folder" && for i in $(seq -w 1 "$n"); do ln -sf "$VOL" "$WORK/folder/v$i.nii.gz"; done
    for workers in ${FOLDER_WORKERS:-1 auto}; do
        log "a folder of $n volumes, --workers $workers"
        name="folder_throughput_workers_$workers"
        timeout 200 /usr/bin/time -v python3 -m covfast infer "$WORK/folder" -o "$WORK/folder_out" -q --device cuda \
            --engine torch --workers "$workers" >"$WORK/$name.txt" 2>&1 || log "folder run failed"
        grep -E "Elapsed|Maximum resident" "$WORK/$name.txt" | tee -a "$WORK/session.log"
        python3 - "$WORK/folder_out" >>"$WORK/$name.txt" 2>&1 <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(path.read_text())
    print(path.parent.name, json.dumps(r["timings_s"]), r.get("engine"))
PY
        rm -rf "$WORK/folder_out"
        pack
    done
    rm -rf "$WORK/folder"
fi

if want ops; then
    log "op benchmarks"
    for suite in infection_ratio reverse_attention coach_mask roi_align engine; do
        timeout 100 python3 -m pytest -q -p no:cacheprovider --benchmark-enable \
            --benchmark-json="$WORK/bench_$suite.json" -s "benchmarks/test_bench_$suite.py" >"$WORK/bench_$suite.log" 2>&1 \
            || log "bench $suite failed"
        pack
    done
fi

if want profile; then
    log "profile of one warm run (cProfile, torch.profiler)"
    timeout 150 python3 benchmarks/profile_e2e.py "$VOL" --device cuda --engine torch --top 40 \
        --out "$WORK/profile_cprofile.txt" --torch-profiler "$WORK/profile_torch.txt" >/dev/null 2>"$WORK/profile.log" \
        || log "profile failed"
    head -n 1 "$WORK/profile_cprofile.txt" | tee -a "$WORK/session.log"
    pack
fi

log "done"
pack
exit $tests_rc
