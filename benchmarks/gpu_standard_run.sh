#!/usr/bin/env bash
# The `standard` profile end to end on the GPU machine, started detached so it can outlive one device call:
#   source benchmarks/device_env.sh; bash benchmarks/gpu_standard_run.sh start PORTRAIT RUN_DIR
#   bash benchmarks/gpu_standard_run.sh wait RUN_DIR SECONDS     (prints progress; returns when done or after SECONDS)
set -u
case "$1" in
  start)
    mkdir -p "$3"
    setsid nohup bash -c "start=\$(date +%s); ophav run '$2' --profile standard --device cuda --out '$3' > '$3.log' 2>&1; echo \"exit \$? after \$((\$(date +%s)-start)) s\" >> '$3.log'" >/dev/null 2>&1 &
    echo "started standard run of $2 in $3";;
  wait)
    deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      if grep -q "^exit " "$2.log" 2>/dev/null; then break; fi
      sleep 10
    done
    grep -v "^W0000\|^I0000" "$2.log" | tail -n 6;;
esac
