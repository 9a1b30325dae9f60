#!/usr/bin/env bash
# Build a large corpus on a Ray cluster: the datatrove stages of lm.data.build run as Ray
# tasks (datatrove's RayPipelineExecutor), stage after stage, from this machine.
#
#   launch/prepare_ray.sh --address=ray://head:10001 --workers=64 -- --config=my_corpus.py
#
# Options (before `--`; what follows `--` goes to lm.prepare):
#   --address=A          the Ray cluster (default: RAY_ADDRESS, else a local Ray instance)
#   --workers=N          at most N tasks of a stage at once (default: one per core here)
#   --cpus_per_task=C --mem_per_cpu_gb=M   each task's CPUs and memory (default 1, 2)
#   --dry_run            print the lm.prepare command, run nothing
# The config's data_dir must be on a file system every Ray node sees. The script sets
# data.build="datatrove" and data.split="hash".
# Call it from any directory: lm.prepare runs in yours, so a relative --config or data path
# means what it means in your shell. It runs the repository's .venv/bin/python (found next
# to this script), or the interpreter LM_PYTHON names.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/options.sh
source "$repo/launch/options.sh"

python="${LM_PYTHON:-$repo/.venv/bin/python}"
flags=(--executor=ray) dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address=*|--cpus_per_task=*|--mem_per_cpu_gb=*) flags+=("--ray_${1#--}") ;;
    --workers=*) flags+=("$1") ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) unknown_option "$0" "$1" lm.prepare ;;
  esac
  shift
done
require_command_flags "$0" $# lm.prepare "--config=my_corpus.py"
defaults=(--config.data.build=datatrove --config.data.split=hash)
command=("$python" -m lm.prepare "$@" "${defaults[@]}" "${flags[@]}")
echo "+ ${command[*]}"
if [[ "$dry_run" == 0 ]]; then
  exec "${command[@]}"
fi
