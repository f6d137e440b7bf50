#!/usr/bin/env bash
# The ablation and the shipped fits of training/RESULTS.md on one GPU, dependencies respected (fine-tuning
# waits for its pretraining). Recipes run as parallel processes: one ~3 M-parameter network leaves an
# H100 mostly idle. Each recipe's log goes to RUNS/log_<recipe>.txt.
# Usage: training/ablation.sh all DATA_ROOT RUNS_DIR
set -euo pipefail
stage=$1
data=$2
runs=$3
recipes=${RECIPES:-training/recipes}
mkdir -p "$runs"

run() {
    local name
    name=$(basename "$1" .json)
    "${PYTHON:-python}" -m training run "$@" --data "$data" --runs "$runs" >"$runs/log_$name.txt" 2>&1
}

wait_for() {
    until [ -f "$runs/$1/final.safetensors" ]; do sleep 5; done
}

case $stage in
all)
    (
        run $recipes/pretrain_coach.json --folds ""
        run $recipes/infnet_coach.json --final &
        run $recipes/pseudo_coach.json --folds "" && run $recipes/infnet_coach_pseudo.json --final
        wait
    ) &
    (run $recipes/pretrain_erase.json --folds "" && run $recipes/infnet_erase.json --final) &
    (run $recipes/infnet_aug.json --final && wait_for pretrain_coach && run $recipes/multiclass.json --final) &
    run $recipes/unet_floor.json &
    run $recipes/infnet_sup.json --final &
    wait
    ;;
*)
    echo "usage: $0 all DATA_ROOT RUNS_DIR" >&2
    exit 2
    ;;
esac
