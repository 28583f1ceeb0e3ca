#!/usr/bin/env bash
# Issue 25's full-length GPU runs in one command, for a lent GPU machine with a time limit:
# hw2's Snell et al. table (experiments.py --preset paper: 60-way ProtoNet training to early
# stopping, 20- and 5-way tests on 1000 tasks; K=1 x 3 seeds and K=5) as four --only workers side by
# side on one GPU (the grid's workers share one folder), and gpu_check.py beside them (its timings
# are then shared-GPU timings). Every process is stopped at SECONDS; what was written comes back in
# OUT: the grid's results.md and plot, the logs, and one tarball per run folder holding its newest
# checkpoint (enough for --resume or --test elsewhere).
#
#   CS330_DATA_MIRROR=<folder with omniglot/*.zip> benchmarks/gpu_paper.sh OUT [SECONDS]
#   (DEVICE=cpu GPU_CHECK=0 ... to try the pipeline without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_paper.sh OUT [SECONDS]}
budget=${2:-500}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CS330_RUNS_DIR=${CS330_RUNS_DIR:-/tmp/cs330_runs}
root=$CS330_RUNS_DIR/hw2_protonet_maml/experiments/paper
mkdir -p "$out/logs"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available())"
# Build the Omniglot store once, so that the four workers do not all decode the zips.
"$py" -c "from common.omniglot import OmniglotStore; print('omniglot store:', len(OmniglotStore.load()), 'characters')"

start=$(date +%s)
for run in K1_s0 K1_s1 K1_s2 K5_s0; do
    timeout "$budget" "$py" hw2_protonet_maml/experiments.py --preset paper --device "${DEVICE:-cuda}" --precision fp32 \
        --threads 2 --only "protonet_paper_${run}*" >"$out/logs/paper_$run.log" 2>&1 &
done
[ "${GPU_CHECK:-1}" = 1 ] && timeout "$budget" "$py" benchmarks/gpu_check.py >"$out/logs/gpu_check.log" 2>&1 &
wait
echo "all workers ended after $(($(date +%s) - start)) s"

cp "$root/results.md" "$root/protonet_paper.png" "$out/" 2>/dev/null
[ -f "$out/logs/gpu_check.log" ] && cp "$out/logs/gpu_check.log" "$out/"
for folder in "$root"/protonet_paper_*/; do
    name=$(basename "$folder")
    newest=$(ls "$folder/checkpoints" 2>/dev/null | sort -V | tail -n 1)
    tar -cf "$out/$name.tar" -C "$root" --exclude=checkpoints "$name"
    [ -n "$newest" ] && tar -rf "$out/$name.tar" -C "$root" "$name/checkpoints/$newest"
    gzip "$out/$name.tar"
done
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -r "$out/logs"
ls -la "$out"
cat "$out/results.md" 2>/dev/null
