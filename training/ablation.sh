#!/usr/bin/env bash
# The ablation and the shipped fits of training/RESULTS.md on one GPU, dependencies respected (fine-tuning
# waits for its pretraining). Recipes run as parallel processes: one ~3 M-parameter network leaves an
# H100 mostly idle. Each recipe's log goes to RUNS/log_<recipe>.txt.
# Usage: training/ablation.sh all|rest DATA_ROOT RUNS_DIR
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

coach_chain() {
    run $recipes/pretrain_coach.json --folds ""
    run $recipes/infnet_coach.json --final &
    run $recipes/pseudo_coach.json --folds "" && run $recipes/infnet_coach_pseudo.json --final
    wait
}

multiclass_chain() {
    run $recipes/infnet_aug.json --final && wait_for pretrain_coach && run $recipes/multiclass.json --final
}

wait_for() {
    until [ -f "$runs/$1/final.safetensors" ]; do sleep 5; done
}

case $stage in
all)
    coach_chain &
    (run $recipes/pretrain_erase.json --folds "" && run $recipes/infnet_erase.json --final) &
    multiclass_chain &
    run $recipes/unet_floor.json &
    run $recipes/infnet_sup.json --final &
    wait
    ;;
rest)
    # What the first full GPU run did not finish inside its time limit (see training/RESULTS.md).
    coach_chain &
    multiclass_chain &
    wait
    ;;
*)
    echo "usage: $0 all|rest DATA_ROOT RUNS_DIR" >&2
    exit 2
    ;;
esac
