#!/usr/bin/env bash
# examples/ablation_fields.yaml (insta vs gaussians, five portraits, preview profile) on the GPU machine, detached
# so it can outlive one device call, then the turntable views of every cell. The shared data travels in .gpu/data:
#   source benchmarks/device_env.sh; bash benchmarks/gpu_fields.sh start STUDY
#   bash benchmarks/gpu_fields.sh wait STUDY SECONDS
#   bash benchmarks/gpu_fields.sh collect STUDY "$OUT"
set -u
case "$1" in
  start)
    mkdir -p "$2" ../shared/data/portraits ../shared/data/driving
    cp -n ../data/*.png ../data/*.jpg ../shared/data/portraits/ 2>/dev/null
    cp -n ../data/*.mp4 ../shared/data/driving/ 2>/dev/null
    setsid nohup bash -c "
      start=\$(date +%s)
      ophav ablate examples/ablation_fields.yaml --out '$2' --device cuda > '$2/ablate.log' 2>&1
      echo \"ablate: exit \$? after \$((\$(date +%s)-start)) s\" >> '$2/times.log'
      for c in '$2'/cells/*/; do ophav eval \"\$c\" --views turntable --out \"\$c/views\" --quiet >> '$2/views.log' 2>&1; done
      echo \"finished after \$((\$(date +%s)-start)) s\" >> '$2/times.log'" >/dev/null 2>&1 &
    echo "started in $2";;
  wait)
    deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      if grep -q "^finished" "$2/times.log" 2>/dev/null; then break; fi
      sleep 10
    done
    cat "$2/times.log" 2>/dev/null; grep -h "^\[" "$2/ablate.log" 2>/dev/null | tail -n 3;;
  collect)
    cp "$2"/results.md "$2"/results.csv "$2"/plot.png "$2"/ablate.log "$2"/times.log "$3"/ 2>/dev/null
    for c in "$2"/cells/*/; do
      n=$(basename "$c"); mkdir -p "$3/views/$n"
      cp "$c"views/*.md "$c"views/*.json "$3/views/$n/" 2>/dev/null
      [ -f "$c"views/views.png ] && cp "$c"views/views.png "$3/views/$n/"
      [ -f "$c"round2/contact.png ] && cp "$c"round2/contact.png "$3/views/$n/contact_round2.png"
    done;;
esac
