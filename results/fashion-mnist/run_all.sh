#!/usr/bin/env bash
# Every Fashion-MNIST experiment of results/fashion-mnist, in order, one after the other.
# Rerunnable: a folder that exists is continued with --resume (finished runs are skipped).
# Usage: bash results/fashion-mnist/run_all.sh [NAME ...]   (default: all but the sweep, in this order; the queue
# names sweep-iid and sweep-mbk4 stand for the schedule sweep's folders, sweep/..., sweep-gn-noniid and sweep-gn-mbk2
# for the Group Normalization sweep's, and long-noniid-w8 for the long run's, long/...), from the repository root with the package installed. RENORM_SRC (the source tree to run, e.g. a `git worktree` of one
# revision, so that every run of the study uses the same code) and RENORM_OUT (where the folders go)
# are optional. Two queues may run at once on different NAMEs (each folder is locked by its writer).
# After each experiment: renorm-repro plot --out results/fashion-mnist/NAME (run also does it).
# Thread pools: one TensorFlow thread a run (the study ran two queues at once on 2 cores). The thread count changes
# the arithmetic (1 against 2 intra-op threads differ from the first evaluation on), so a rerun needs the settings of
# the run it repeats: these are the study queues' (the schedule study and the long run); set the variables to
# override them.
export TF_NUM_INTRAOP_THREADS="${TF_NUM_INTRAOP_THREADS:-1}" TF_NUM_INTEROP_THREADS="${TF_NUM_INTEROP_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set -u
ARGS=("$@")
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
# The schedule study (issue: "the verdict rests on a clipping schedule it never varied"). Sweep: the Batch
# Renorm arm of Figure 1 (i.i.d.) and Figure 2 at k=4 under warm-ups of 1.25, 5, 10 and 20 moving-average time
# constants (100 steps each at momentum 0.99; the ramps keep the scaled paper schedule's lengths after the
# warm-up) x final limits rmax/dmax 1.5/0.5 and 3/5, on seeds 10-11 only (the final comparison uses other
# seeds), with batch norm on the same seeds; the schedule is chosen on the validation split.
SWEEP_SEEDS="--seeds 10,11 --log-clip-means true"
SWEEP_IID=(sweep/iid-bn) SWEEP_MBK4=(sweep/mbk4-bn)
CMD[sweep/iid-bn]="--experiment iid --preset fashion --arms bn $SWEEP_SEEDS"
CMD[sweep/mbk4-bn]="--experiment microbatch --preset fashion --microbatch-size 4 --arms bn_micro $SWEEP_SEEDS"
for lim in "1.5 0.5" "3 5"; do
  set -- $lim
  for tau in 1.25 5 10 20; do
    SWEEP_IID+=("sweep/iid-tau$tau-r$1-d$2") SWEEP_MBK4+=("sweep/mbk4-tau$tau-r$1-d$2")
    CMD[sweep/iid-tau$tau-r$1-d$2]="--experiment iid --preset fashion --arms brn --warmup-time-constants $tau --rmax $1 --dmax $2 $SWEEP_SEEDS"
    CMD[sweep/mbk4-tau$tau-r$1-d$2]="--experiment microbatch --preset fashion --microbatch-size 4 --arms brn_micro --warmup-time-constants $tau --rmax $1 --dmax $2 $SWEEP_SEEDS"
  done
done
set --
# Final comparison of Figure 1 with the schedule the i.i.d. sweep chose on validation (sweep/iid.md: warm-up 20 time
# constants, rmax/dmax 1.5/0.5) on seeds 20-24, which neither the sweep nor the pilot used. One folder per arm
# so that two queues can run at once; `renorm-repro pool final/iid-bn final/iid-brn` pairs them by seed.
FINAL_IID="--experiment iid --preset fashion --warmup-time-constants 20 --rmax 1.5 --dmax 0.5 --seeds 20,21,22,23,24 --log-clip-means true"
CMD[final/iid-bn]="$FINAL_IID --arms bn"
CMD[final/iid-brn]="$FINAL_IID --arms brn"
# The premise experiment with that schedule: non-i.i.d. 4 x 8 is where batch norm clearly loses here (-2.29 points
# against batch norm on i.i.d. minibatches, results/fashion-mnist/README.md), so it is where Batch Renorm has
# something to recover. Same schedule (chosen on the i.i.d. sweep's validation split, not on this experiment),
# fresh seeds 20-24; batch norm and its i.i.d. reference in one folder, Batch Renorm in another.
FINAL_NONIID="--experiment noniid --preset fashion --warmup-time-constants 20 --rmax 1.5 --dmax 0.5 --seeds 20,21,22,23,24 --log-clip-means true"
CMD[final/noniid-bn]="$FINAL_NONIID --arms bn,bn_iid"
CMD[final/noniid-brn]="$FINAL_NONIID --arms brn"
# Width, separated from length: the long run (below) changed two things at once, 10x the steps with the paper's
# breakpoints and width 8 against the presets' 16. The Figure 3 final again at width 8, all else as above (4000
# steps, the i.i.d. sweep's schedule, seeds 20-24): if Batch Renorm recovers about a quarter of the loss here as
# at width 16, the long run's larger share comes with its length and schedule, not with the narrower net.
FINAL_NONIID_W8="$FINAL_NONIID --width 8"
CMD[final/noniid-w8-bn]="$FINAL_NONIID_W8 --arms bn,bn_iid"
CMD[final/noniid-w8-brn]="$FINAL_NONIID_W8 --arms brn"
# Final comparison of Figure 2 at k=4 with the schedule the k=4 sweep chose on validation (sweep/mbk4.md: warm-up
# 20 time constants, rmax/dmax 3/5; 1.5/0.5 at the same warm-up was 0.02 points behind), seeds 20-24.
FINAL_MBK4="--experiment microbatch --preset fashion --microbatch-size 4 --warmup-time-constants 20 --rmax 3 --dmax 5 --seeds 20,21,22,23,24 --log-clip-means true"
CMD[final/mbk4-bn]="$FINAL_MBK4 --arms bn_micro"
CMD[final/mbk4-brn]="$FINAL_MBK4 --arms brn_micro"
# The premise at k=2, where batch norm on micro-batches loses to groups of 32 (-0.84 [-1.18, -0.50] points in
# microbatch-k2): the k=4 sweep's schedule (the micro-batch setting closest to it; not chosen on k=2), seeds 20-24.
# bn_32 (its own folder) does not depend on k, so it is also the k=4 final's groups-of-32 reference.
FINAL_MBK2="--experiment microbatch --preset fashion --microbatch-size 2 --warmup-time-constants 20 --rmax 3 --dmax 5 --seeds 20,21,22,23,24 --log-clip-means true"
CMD[final/mbk2-bn]="$FINAL_MBK2 --arms bn_micro"
CMD[final/mbk2-brn]="$FINAL_MBK2 --arms brn_micro"
CMD[final/mb-bn32]="$FINAL_MBK2 --arms bn_32"
# Toward the paper's regime: non-i.i.d. 4 x 8 with the convnet at width 8 for 40000 steps (~23 epochs) and the
# paper's breakpoints unscaled (batch norm for 5000 steps = 50 time constants, dmax -> 5 at 25000, rmax -> 3 at
# 40000), an evaluation every 1000 steps; batch norm, Batch Renorm, Keras's renorm, batch norm on i.i.d.
# minibatches (the loss to recover). One folder per seed (seeds outer, so every finished folder is a complete
# paired set); the queue name long-noniid-w8 stands for the five folders. Long (~2 h per folder with two queues):
# resumable; two queues given long-noniid-w8 share the folders (a folder another queue holds is skipped).
LONG="--experiment noniid --preset fashion --width 8 --steps 40000 --schedule-base paper --eval-every 1000 --checkpoint-every 2000 --log-clip-means true"
LONG_NONIID=()
for seed in 0 1 2 3 4; do
  LONG_NONIID+=("long/noniid-w8-seed$seed")
  CMD[long/noniid-w8-seed$seed]="$LONG --arms bn,brn,keras_brn,bn_iid --seeds $seed"
done
# Length, separated from the schedule: the long run's Batch Renorm arm again, 40000 steps at width 8, but with the
# Figure 3 final's schedule in absolute steps (warm-up 2000 = 20 time constants, dmax -> 0.5 at 2500, rmax -> 1.5
# at 2875) instead of the paper's unscaled one; seeds 0-4 in two folders (two queues), paired with the long run's
# folders of the same seeds (whose batch norm arms do not read the schedule).
LONG_SHORT_SCHEDULE="$LONG --arms brn --warmup-steps 2000 --dmax-steps 2500 --rmax-steps 2875 --rmax 1.5 --dmax 0.5"
CMD[long/noniid-w8-final-schedule-seeds0-2]="$LONG_SHORT_SCHEDULE --seeds 0,1,2"
CMD[long/noniid-w8-final-schedule-seeds3-4]="$LONG_SHORT_SCHEDULE --seeds 3,4"
# The long regime with a short warm-up (issue 31; decision rule written in results/fashion-mnist/README.md before the
# runs): the long run's Batch Renorm arm, 40000 steps at width 8, with the 4000-step runs' scaled schedule in absolute
# steps (warm-up 125 = 1.25 time constants, dmax at 625, rmax at 1000), once with the paper's limits 3/5 and once with
# 1.5/0.5 (the final schedule's limits and ramp lengths: against long/noniid-w8-final-schedule only the warm-up
# differs); seeds 0-4 paired with the long run's batch norm arms. One folder per limit pair (two queues).
LONG_SHORT_WARMUP="$LONG --arms brn --warmup-steps 125 --dmax-steps 625 --rmax-steps 1000"
CMD[long/noniid-w8-warmup125-r3-d5]="$LONG_SHORT_WARMUP --rmax 3 --dmax 5 --seeds 0,1,2,3,4"
CMD[long/noniid-w8-warmup125-r1.5-d0.5]="$LONG_SHORT_WARMUP --rmax 1.5 --dmax 0.5 --seeds 0,1,2,3,4"
# Group Normalization (issue 31 item 2): Keras's own GroupNormalization(groups=G) in place of every batch norm of the
# same convnet, all else as the finals (its layers read no batch statistic, so neither the non-i.i.d. minibatches nor
# the micro-batches of k can hurt it: the question is whether it beats batch norm there at all). The group count is
# chosen on the validation split of seeds 10-11 (sweep: G in 2, 4, 8, which divide the widths 16, 32, 64, 128), in
# the Figure 3 final's non-i.i.d. setting and the k=2 final's micro-batch setting; the queue names sweep-gn-noniid
# and sweep-gn-mbk2 stand for the sweep's folders.
SWEEP_GN_NONIID=() SWEEP_GN_MBK2=()
FINAL_SEEDS="--seeds 20,21,22,23,24"
for g in 2 4 8; do
  SWEEP_GN_NONIID+=("sweep/gn-noniid-g$g") SWEEP_GN_MBK2+=("sweep/gn-mbk2-g$g")
  CMD[sweep/gn-noniid-g$g]="${FINAL_NONIID/$FINAL_SEEDS/--seeds 10,11} --arms gn --gn-groups $g"
  CMD[sweep/gn-mbk2-g$g]="${FINAL_MBK2/$FINAL_SEEDS/--seeds 10,11} --arms gn --gn-groups $g"
done
# The GN finals on seeds 20-24, paired by seed with the committed batch-norm finals (`renorm-repro pool final/noniid-bn
# final/noniid-brn final/noniid-gn`, `... final/mbk2-bn final/mbk2-brn final/mb-bn32 final/mbk2-gn-seeds20-22
# final/mbk2-gn-seeds23-24`; gn_groups is read only by the gn arm, so the folders pool). The k=2 final is two folders
# so that two queues could run it at once. The group counts are the sweeps' validation choices (the highest mean
# val_last4 over sweep/gn-*-g*): GN_GROUPS_NONIID=8 (85.88 / 86.37 / 86.78 % with 2 / 4 / 8), GN_GROUPS_MBK2=2 (91.38 /
# 91.31 / 91.35 %: a tie on 2 seeds, broken by the rule as written).
GN_GROUPS_NONIID="${GN_GROUPS_NONIID:-8}" GN_GROUPS_MBK2="${GN_GROUPS_MBK2:-2}"
CMD[final/noniid-gn]="$FINAL_NONIID --arms gn --gn-groups $GN_GROUPS_NONIID"
CMD[final/mbk2-gn-seeds20-22]="${FINAL_MBK2/$FINAL_SEEDS/--seeds 20,21,22} --arms gn --gn-groups $GN_GROUPS_MBK2"
CMD[final/mbk2-gn-seeds23-24]="${FINAL_MBK2/$FINAL_SEEDS/--seeds 23,24} --arms gn --gn-groups $GN_GROUPS_MBK2"
# Precise BN (Wu & Johnson 2021; issue 31 item 3): the batch-norm arms of the i.i.d., k=2 and non-i.i.d. finals again,
# identical arguments (same training, bit for bit: precise BN evaluates on a copy of the moving statistics) plus
# population statistics recomputed at every evaluation on 100 fixed i.i.d. training batches of the run's batch size
# (3200 images at 32, 12800 at 128): the *_precise columns tell how much of batch norm's loss is the lag or noise of
# its moving averages rather than the training itself.
PRECISE="--precise-bn-batches 100"
CMD[final/iid-bn-precise]="${CMD[final/iid-bn]} $PRECISE"
# The k=2 rerun is two folders of seeds 20-22 and 23-24 (two queues at once, as the k=2 GN final; pool pairs by seed).
CMD[final/mbk2-bn-precise-seeds20-22]="${FINAL_MBK2/$FINAL_SEEDS/--seeds 20,21,22} --arms bn_micro $PRECISE"
CMD[final/mbk2-bn-precise-seeds23-24]="${FINAL_MBK2/$FINAL_SEEDS/--seeds 23,24} --arms bn_micro $PRECISE"
CMD[final/noniid-bn-precise]="${CMD[final/noniid-bn]} $PRECISE"
ORDER=(noniid noniid-constant-lr microbatch-k2 microbatch-k4 iid noniid-constant-lr-momentum0.9 noniid-constant-lr-2000steps
       noniid-constant-lr-2000steps-seeds5-9)
[ "${#ARGS[@]}" -gt 0 ] && ORDER=()
for a in "${ARGS[@]}"; do  # a queue name stands for its folders
  case "$a" in
    sweep-iid) ORDER+=("${SWEEP_IID[@]}") ;;
    sweep-mbk4) ORDER+=("${SWEEP_MBK4[@]}") ;;
    long-noniid-w8) ORDER+=("${LONG_NONIID[@]}") ;;
    sweep-gn-noniid) ORDER+=("${SWEEP_GN_NONIID[@]}") ;;
    sweep-gn-mbk2) ORDER+=("${SWEEP_GN_MBK2[@]}") ;;
    *) [ -n "${CMD[$a]+x}" ] || { echo "run_all.sh: unknown experiment $a" >&2; exit 2; }; ORDER+=("$a") ;;
  esac
done
for name in "${ORDER[@]}"; do
  resume=""
  [ -f "$OUT/$name/config.json" ] && resume="--resume"
  echo "== $name: renorm-repro run ${CMD[$name]} --out $OUT/$name $resume"
  start=$(date +%s)
  python -m renorm_repro.cli run ${CMD[$name]} --out "$OUT/$name" $resume --no-progress
  echo "== $name: exit $? after $(( $(date +%s) - start )) s"
done
