#!/usr/bin/env bash
# Every Fashion-MNIST experiment of results/fashion-mnist, in order, one after the other.
# Rerunnable: a folder that exists is continued with --resume (finished runs are skipped).
# Usage: bash results/fashion-mnist/run_all.sh [NAME ...]   (default: all, in this order), from the repository
# root with the package installed. RENORM_SRC (the source tree to run, e.g. a `git worktree` of one
# revision, so that every run of the study uses the same code) and RENORM_OUT (where the folders go)
# are optional. Two queues may run at once on different NAMEs (each folder is locked by its writer).
# After each experiment: renorm-repro plot --out results/fashion-mnist/NAME (run also does it).
set -u
cd "${RENORM_SRC:-$(dirname "$0")/../..}"
OUT="${RENORM_OUT:-results/fashion-mnist}"
declare -A CMD=(
  [noniid]="--experiment noniid --preset fashion"
  [noniid-constant-lr]="--experiment noniid --preset fashion --arms bn,brn,keras_brn --lr-schedule constant"
  [microbatch-k2]="--experiment microbatch --preset fashion"
  [iid]="--experiment iid --preset fashion"
  [microbatch-k4]="--experiment microbatch --preset fashion --microbatch-size 4"
  [noniid-constant-lr-momentum0.9]="--experiment noniid --preset fashion --arms bn,brn,keras_brn --lr-schedule constant --momentum 0.9"
  [noniid-constant-lr-2000steps]="--experiment noniid --preset fashion --arms bn,brn,keras_brn --lr-schedule constant --steps 2000"
  [noniid-constant-lr-2000steps-seeds5-9]="--experiment noniid --preset fashion --arms brn,keras_brn --lr-schedule constant --steps 2000 --seeds 5,6,7,8,9"
)
ORDER=(noniid noniid-constant-lr microbatch-k2 microbatch-k4 iid noniid-constant-lr-momentum0.9 noniid-constant-lr-2000steps
       noniid-constant-lr-2000steps-seeds5-9)
[ "$#" -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  resume=""
  [ -f "$OUT/$name/config.json" ] && resume="--resume"
  echo "== $name: renorm-repro run ${CMD[$name]} --out $OUT/$name $resume"
  start=$(date +%s)
  python -m renorm_repro.cli run ${CMD[$name]} --out "$OUT/$name" $resume --no-progress
  echo "== $name: exit $? after $(( $(date +%s) - start )) s"
done
