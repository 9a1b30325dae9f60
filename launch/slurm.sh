#!/usr/bin/env bash
# Submit a multi-node GPU run to SLURM (launch/slurm.sbatch does the work on the nodes).
#
#   launch/slurm.sh --nodes=4 --gpus_per_node=8 -- --config=configs/shakespeare_char.py:gpu --workdir=/shared/run
#
# Options (before `--`; what follows `--` goes to lm.main):
#   --nodes=N            nodes (default 1)
#   --gpus_per_node=G    GPUs per node (default 8)
#   --per_node           one process per node driving all its GPUs (default: one per GPU)
#   --partition=P --time=T --account=A   passed to sbatch
#   --dry_run            print the sbatch command, then what process 0 of the job would
#                        run and use (SLURM's variables simulated), and submit nothing
# The nodes run the repository's .venv/bin/python (made by the README's install), or
# the interpreter LM_PYTHON names. Call it from any directory: the job starts in yours
# (SLURM's default), so a relative --config or data path means what it means in your shell;
# the repository is found next to this script and passed to the job as LM_REPO.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/options.sh
source "$repo/launch/options.sh"

nodes=1 gpus=8 per_node=0 dry_run=0
sbatch_extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per_node) per_node=1 ;;
    --partition=*|--time=*|--account=*) sbatch_extra+=("$1") ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) unknown_option "$0" "$1" lm.main ;;
  esac
  shift
done
require_command_flags "$0" $# lm.main "--config=configs/shakespeare_char.py:gpu --workdir=/shared/run"
tasks_per_node=$(( per_node == 1 ? 1 : gpus ))
command=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus"
         "${sbatch_extra[@]}" "--export=ALL,LM_REPO=$repo" "$repo/launch/slurm.sbatch" "$@")
echo "+ ${command[*]}"
if [[ "$dry_run" == 0 ]]; then
  exec "${command[@]}"
fi
# What the job's first process would run, with the variables SLURM would give it.
SLURM_JOB_ID=12345 SLURM_NNODES="$nodes" SLURM_JOB_NODELIST="node[001-$(printf '%03d' "$nodes")]" \
SLURM_NTASKS=$(( nodes * tasks_per_node )) SLURM_NTASKS_PER_NODE="$tasks_per_node" SLURM_PROCID=0 SLURM_LOCALID=0 \
LM_REPO="$repo" LM_DRY_RUN=1 bash "$repo/launch/slurm.sbatch" "$@"
