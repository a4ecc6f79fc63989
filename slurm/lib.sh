# Helpers for the sbatch scripts in slurm/ (sourced, never run; defining them has no side effect).
# The pure ones (port, hostfile) are unit-tested in tests/test_launchers.py; the rest run in tests/test_slurm.py.

# condmoe_master_port JOB_ID: the rendezvous port of a job. Every task derives the same one from the job id without
# talking to the others, and jobs sharing a node get different ones. 15000-29999 stays below Linux's ephemeral range
# (32768-60999), where outgoing connections take their local ports and could hold ours.
condmoe_master_port() {
  echo $((15000 + $1 % 15000))
}

# condmoe_hostfile SLOTS HOST...: a DeepSpeed hostfile, "HOST slots=SLOTS" per host. The order is the node rank: the
# first host is node 0, holds rank 0 and must be MASTER_ADDR.
condmoe_hostfile() {
  local slots=$1 host
  shift
  for host in "$@"; do
    printf '%s slots=%s\n' "$host" "$slots"
  done
}

# condmoe_hosts NODELIST: the host names of a SLURM node list (n[1-2] -> n1 n2), one per line, in node-id order.
condmoe_hosts() {
  scontrol show hostnames "$1"
}

# condmoe_gpus_per_node: processes the deepspeed launcher starts per node. CONDMOE_GPUS_PER_NODE if set, else the
# GPUs SLURM gave this node (--gpus-per-node), else the tasks per node of the allocation (--ntasks-per-node).
condmoe_gpus_per_node() {
  local gpus=${CONDMOE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-}}}
  gpus=${gpus%%(*}  # SLURM_NTASKS_PER_NODE may read "8(x2)"
  if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
    echo "condmoe: cannot tell the GPUs per node: pass --gpus-per-node or export CONDMOE_GPUS_PER_NODE" >&2
    return 1
  fi
  echo "$gpus"
}

# condmoe_run_preemptible CMD...: runs the job step CMD (an srun) so that a preemption warning checkpoints and
# requeues the job; returns CMD's exit status.
#
# `--signal=B:USR1@T` signals only the batch shell, and bash runs a trap only once the foreground command has ended,
# so the step runs in the background while this shell waits. On USR1 the trap forwards the signal to srun, which
# forwards it to every process of the step: the ranks finish their step, checkpoint and exit 75 (train/signals.py).
# Only then is the job requeued (`scontrol requeue` cancels whatever still runs), and the requeued job
# (SLURM_RESTART_COUNT=1, 2, ...) resumes from that checkpoint (run.resume=auto). A step that failed with 75 without
# USR1 here (`scancel --signal=USR1 JOB` reaches the steps only) is requeued too. SIGTERM (scancel, the time limit)
# is forwarded but never requeues: a cancelled job stays cancelled. A step that succeeded is never requeued.
condmoe_run_preemptible() {
  local rc=0
  _condmoe_usr1=0 _condmoe_term=0 _condmoe_step=
  # Traps first: a signal that comes while the step starts must not kill this shell (bash's default for USR1).
  trap '_condmoe_usr1=1; echo "condmoe: USR1 (preemption warning) at $(date +%T): checkpoint, then requeue"
        [ -z "$_condmoe_step" ] || kill -USR1 "$_condmoe_step" 2>/dev/null || true' USR1
  trap '_condmoe_term=1; [ -z "$_condmoe_step" ] || kill -TERM "$_condmoe_step" 2>/dev/null || true' TERM
  "$@" &
  _condmoe_step=$!
  # A trapped signal ends `wait` early (status > 128) while the step runs on: wait until it has really ended.
  wait "$_condmoe_step" || rc=$?
  while kill -0 "$_condmoe_step" 2>/dev/null; do
    rc=0
    wait "$_condmoe_step" || rc=$?
  done
  trap - USR1 TERM
  if [ "$rc" != 0 ] && { [ "$_condmoe_usr1" = 1 ] || { [ "$rc" = 75 ] && [ "$_condmoe_term" = 0 ]; }; }; then
    echo "condmoe: step ended with status $rc at $(date +%T); requeueing job $SLURM_JOB_ID"
    # Requeueing ends this script; if it is refused (a job submitted with --no-requeue), report the step's status.
    scontrol requeue "$SLURM_JOB_ID" || echo "condmoe: requeue refused; resubmit to resume" >&2
  fi
  return "$rc"
}
