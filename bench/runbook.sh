#!/bin/bash
# The original runbook's router, as a bash script (bench/trace.py runs it side by side with gpu-router):
# the input's metric (here its size in bytes stands for its media minutes) under THRESHOLD → one of GPU_SLOTS flock
# slots on GPU 0, else one of CPU_SLOTS on the CPU; no free slot → exit 1, or with WAIT > 0 poll the slots that
# long first. The lock's descriptor is inherited through exec: held exactly as long as the job runs.
#   runbook.sh JOB ARGS... INPUT      (env: LOCKS THRESHOLD GPU_SLOTS CPU_SLOTS WAIT)
set -u
job=$1; shift
input=${!#}
metric=$(stat -c %s -- "$input") || exit 1
if (( metric < THRESHOLD )); then pool=gpu; n=$GPU_SLOTS; else pool=cpu; n=$CPU_SLOTS; fi
deadline=$(( $(date +%s%N) + ${WAIT:-0} * 1000000000 ))
while :; do
    for (( s = 0; s < n; s++ )); do
        exec {fd}>"$LOCKS/$pool.$s"
        if flock -n "$fd"; then
            if [[ $pool == gpu ]]; then
                CUDA_VISIBLE_DEVICES=0 exec "$job" "$@" --device cuda
            fi
            CUDA_VISIBLE_DEVICES= exec "$job" "$@" --device cpu
        fi
        exec {fd}>&-
    done
    (( $(date +%s%N) < deadline )) || { echo "runbook: no free $pool slot" >&2; exit 1; }
    sleep 0.1
done
