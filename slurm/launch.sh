# The launch command of a tmass entry point inside a SLURM job, shared by train.sbatch and eval.sbatch (sourced
# from the submit directory, the repository's root). Sets RANKS_PER_NODE, NODES, MASTER_ADDR, MASTER_PORT and
# `launch_command SCRIPT ARGS...`, which fills the array CMD (the hostfile goes to $HOSTFILE, else a temporary file):
#   LAUNCH_MODE=srun          srun, one task per rank; tmass.dist maps SLURM_PROCID/LOCALID/NTASKS onto torch's
#   LAUNCH_MODE=deepspeed     DeepSpeed's launcher: on one node its local mode (no hostfile, no ssh); on several
#                             over a hostfile of the job's nodes, through DS_LAUNCHER (pdsh: passwordless ssh
#                             between the nodes; openmpi; slurm: srun)
# The ranks meet at the job's first node; TMASS_MASTER_ADDR replaces its name where the node names do not
# resolve on the network the ranks should use (give the first node's address on that network).
PYTHON=${PYTHON:-python}
LAUNCH_MODE=${LAUNCH_MODE:-deepspeed}
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
GPUS=${GPUS##*:}  # "h100:8" -> 8
RANKS_PER_NODE=${RANKS_PER_NODE:-$GPUS}  # one rank per GPU; set it on CPU-only nodes (sbatch --gpus-per-node=0)
if ! [ "$RANKS_PER_NODE" -ge 1 ] 2>/dev/null; then
  echo "error: no GPUs on the node ($GPUS): set RANKS_PER_NODE to the ranks per node" \
       "(and DS_ACCELERATOR=cpu on CPU nodes)" >&2
  exit 2
fi
NODES=${SLURM_JOB_NUM_NODES:-1}
MASTER_ADDR=${TMASS_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}  # not head: SIGPIPE
MASTER_PORT=$((29500 + ${SLURM_JOB_ID:-0} % 20000))
export MASTER_ADDR MASTER_PORT  # srun's tasks (LAUNCH_MODE=srun, DS_LAUNCHER=slurm) read them

launch_command() {  # SCRIPT ARGS... -> CMD
  local script=$1
  shift
  if [ "$LAUNCH_MODE" = srun ]; then
    CMD=(srun --ntasks-per-node="$RANKS_PER_NODE" --ntasks=$((NODES * RANKS_PER_NODE)) --kill-on-bad-exit=1
         "$PYTHON" "$script" "$@")
  elif [ "$NODES" = 1 ]; then  # with a hostfile, the launcher would ssh to this very node
    CMD=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$RANKS_PER_NODE" --master_port "$MASTER_PORT"
         "$script" "$@")
  else
    local hostfile=${HOSTFILE:-$(mktemp "${TMPDIR:-/tmp}/tmass-hostfile-XXXXXX")}
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$RANKS_PER_NODE/" > "$hostfile"
    local extra=()
    # srun reaches the nodes, not ssh; it places RANKS_PER_NODE tasks on each
    [ "$DS_LAUNCHER" = slurm ] && extra=(--no_ssh_check "--launcher_args=--ntasks-per-node=$RANKS_PER_NODE")
    CMD=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --launcher "$DS_LAUNCHER" "${extra[@]}"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$script" "$@")
  fi
}
