#!/usr/bin/env bash
# Build a large corpus on SLURM: the datatrove stages of lm.data.build as dependent job
# arrays (one task per input shard), the last of which assembles the dataset.
#
#   launch/prepare_slurm.sh --partition=cpu --account=A -- --config=my_corpus.py
#
# Options (before `--`; what follows `--` goes to lm.prepare):
#   --partition=P --time=T --qos=Q   the jobs' partition (required), time limit, QOS
#   --account=A                      passed to sbatch (#SBATCH --account)
#   --cpus_per_task=C --mem_per_cpu_gb=M   each task's CPUs and memory (default 1, 2)
#   --workers=N                      at most N tasks of a stage at once (default: no limit)
#   --dry_run                        print the sbatch scripts of every stage, submit nothing
# The jobs source the repository's .venv/bin/activate (made by the README's install), or
# the virtualenv LM_VENV names, and read and write the config's data_dir: put it on a
# file system every node sees. The script sets data.build="datatrove" and
# data.split="hash".
# Call it from any directory: lm.prepare runs in yours and the jobs start there too (SLURM's
# default), so a relative --config or data path means what it means in your shell.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/options.sh
source "$repo/launch/options.sh"

venv="${LM_VENV:-$repo/.venv}"
flags=(--executor=slurm "--slurm_venv=$venv/bin/activate")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --partition=*|--time=*|--qos=*|--cpus_per_task=*|--mem_per_cpu_gb=*) flags+=("--slurm_${1#--}") ;;
    --account=*) flags+=("--slurm_sbatch_arg=account=${1#*=}") ;;
    --workers=*|--dry_run) flags+=("$1") ;;
    --) shift; break ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) unknown_option "$0" "$1" lm.prepare ;;
  esac
  shift
done
require_command_flags "$0" $# lm.prepare "--config=my_corpus.py"
defaults=(--config.data.build=datatrove --config.data.split=hash)
command=("$venv/bin/python" -m lm.prepare "$@" "${defaults[@]}" "${flags[@]}")
echo "+ ${command[*]}"
exec "${command[@]}"
