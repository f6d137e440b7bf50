#!/usr/bin/env bash
# The ablation and the shipped fits of training/RESULTS.md on one GPU, in two stages (stage 2 needs the
# pretrained networks of stage 1). Recipes run as parallel processes: one ~3 M-parameter network leaves an
# H100 mostly idle. Each recipe's log goes to RUNS/log_<recipe>.txt.
# Usage: training/ablation.sh stage1|stage2 DATA_ROOT RUNS_DIR
set -euo pipefail
stage=$1
data=$2
runs=$3
recipes=training/recipes
mkdir -p "$runs"

run() {
    local name
    name=$(basename "$1" .json)
    "${PYTHON:-python}" -m training run "$@" --data "$data" --runs "$runs" >"$runs/log_$name.txt" 2>&1
}

case $stage in
stage1)
    (run $recipes/pretrain_coach.json --folds "" && run $recipes/pseudo_coach.json --folds "") &
    run $recipes/pretrain_erase.json --folds "" &
    run $recipes/unet_floor.json &
    run $recipes/infnet_sup.json &
    run $recipes/infnet_aug.json --final &
    wait
    ;;
stage2)
    (run $recipes/infnet_coach_pseudo.json --final && run $recipes/multiclass.json --final) &
    run $recipes/infnet_coach.json &
    run $recipes/infnet_erase.json &
    run $recipes/multiclass_unet_floor.json &
    wait
    ;;
*)
    echo "usage: $0 stage1|stage2 DATA_ROOT RUNS_DIR" >&2
    exit 2
    ;;
esac
