#!/usr/bin/env bash
# examples/ablation_preview.yaml (2 portraits x 2 restorers x rounds 0, 1, 2) on the GPU machine, twice: with the
# cells sharing their common steps (the default) and with --no-reuse, so the saving is measured, not estimated.
# Started detached so it can outlive one device call (carry .whl with the example plugin's wheel, and .gpu with
# Julia_Roberts_crop.png: the grid reads it from ../shared/data beside the checkout, which does not travel):
#   source benchmarks/device_env.sh; bash benchmarks/gpu_ablate.sh start STUDIES
#   bash benchmarks/gpu_ablate.sh wait STUDIES SECONDS      (prints progress; returns when done or after SECONDS)
#   bash benchmarks/gpu_ablate.sh collect STUDIES "$OUT"    (tables, plots and logs, at most 8 files)
set -u
grid=examples/ablation_preview.yaml
case "$1" in
  start)
    mkdir -p "$2" ../shared/data/portraits
    cp -n .gpu/Julia_Roberts_crop.png ../shared/data/portraits/ 2>/dev/null
    setsid nohup bash -c "
      for mode in reuse no-reuse; do
        start=\$(date +%s)
        ophav ablate $grid --out '$2/'\$mode --device cuda --\$mode > '$2/'\$mode.log 2>&1
        echo \"\$mode: exit \$? after \$((\$(date +%s)-start)) s\" >> '$2/times.log'
      done; echo finished >> '$2/times.log'" >/dev/null 2>&1 &
    echo "started the study twice (reuse, no-reuse) in $2";;
  wait)
    deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      if grep -q "^finished" "$2/times.log" 2>/dev/null; then break; fi
      sleep 10
    done
    cat "$2/times.log" 2>/dev/null
    for mode in reuse no-reuse; do grep -h "^\[" "$2/$mode.log" 2>/dev/null | tail -n 2; done;;
  collect)
    for mode in reuse no-reuse; do
      for f in results.md plot.png; do cp "$2/$mode/$f" "$3/${mode}_$f" 2>/dev/null; done
      cp "$2/$mode.log" "$3/" 2>/dev/null
    done
    cp "$2/times.log" "$3/" 2>/dev/null;;
esac
