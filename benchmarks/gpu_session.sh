#!/usr/bin/env bash
# Every GPU figure that issues 4 and 6 ask for, collected in one call on a lent GPU machine (H100 / H200 with
# torch, triton, torchvision, nvcc and cmake; no network). From the repository root, through the device tool:
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devcarry/whl", ".devcarry/opslib"], timeout_s=600)
#
# .devcarry/whl holds the wheels the machine lacks (connected-components-3d, nibabel, pydicom, isal; cp312), and
# .devcarry/opslib pytest-benchmark with its pure-Python dependencies (see the device tool's README for how to
# download them). Everything lands in $OUT/gpu_session.tar.gz (the tool returns at most 8 files) plus the log.
# Steps that fail are logged and the next step still runs; the exit status is that of the CUDA tests.
set -uo pipefail
OUT=${OUT:-/tmp/covfast-gpu-session}
WORK=$(mktemp -d)
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$WORK/session.log"; }

log "install"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl >"$WORK/install.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD/.devcarry/opslib PYTHONUNBUFFERED=1
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
python3 -m pip install -q --no-build-isolation --no-deps -e . -Ceditable.mode=redirect \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" >>"$WORK/install.log" 2>&1 || log "build failed (install.log)"
{ nvidia-smi; python3 -m covfast info; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    >"$WORK/machine.txt" 2>&1

log "CUDA-marked tests"
python3 -m pytest -q -p no:cacheprovider -m cuda tests >"$WORK/cuda_tests.log" 2>&1
tests_rc=$?
tail -n 3 "$WORK/cuda_tests.log" | tee -a "$WORK/session.log"

log "op benchmarks"
for suite in infection_ratio reverse_attention coach_mask roi_align engine; do
    python3 -m pytest -q -p no:cacheprovider --benchmark-enable --benchmark-json="$WORK/bench_$suite.json" -s \
        "benchmarks/test_bench_$suite.py" >"$WORK/bench_$suite.log" 2>&1 || log "bench $suite failed"
done

log "end to end on a P001-sized volume"
python3 benchmarks/make_timing_volume.py "$WORK/p001_size.nii.gz" >>"$WORK/session.log" 2>&1
for engine in torch onnx; do
    for precision in fp32 fp16; do
        [ "$engine" = onnx ] && [ "$precision" = fp16 ] && continue
        python3 -m covfast benchmark "$WORK/p001_size.nii.gz" --device cuda --engine "$engine" --precision "$precision" \
            --runs 5 --json "$WORK/e2e_cuda_${engine}_${precision}.json" >"$WORK/e2e_cuda_${engine}_${precision}.txt" 2>&1 \
            || log "e2e $engine $precision failed"
    done
done
# The Inf-Net alone (without the U-Net partner), for the ensemble's cost on the GPU.
python3 -m covfast benchmark "$WORK/p001_size.nii.gz" --device cuda --engine torch --precision fp16 --no-ensemble \
    --runs 5 --json "$WORK/e2e_cuda_torch_fp16_no_ensemble.json" >"$WORK/e2e_cuda_torch_fp16_no_ensemble.txt" 2>&1 \
    || log "e2e no-ensemble failed"
mkdir -p "$WORK/folder" && for i in 1 2 3 4 5 6; do ln -sf "$WORK/p001_size.nii.gz" "$WORK/folder/v$i.nii.gz"; done
/usr/bin/time -v python3 -m covfast infer "$WORK/folder" -o "$WORK/folder_out" -q --device cuda --engine torch \
    >"$WORK/folder_throughput.txt" 2>&1 || log "folder run failed"
rm -rf "$WORK/folder_out" "$WORK/folder" "$WORK/p001_size.nii.gz"

log "done"
tar -czf "$OUT/gpu_session.tar.gz" -C "$WORK" .
cp "$WORK/session.log" "$OUT/session.log"
exit $tests_rc
