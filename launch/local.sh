#!/usr/bin/env bash
# Train on this machine: creates .venv and installs the package on first use, then runs
# lm.main with the flags you give (default: the Shakespeare recipe).
#
#   launch/local.sh                                        # configs/shakespeare_char.py in /tmp/lm/shakespeare_char
#   launch/local.sh --config=configs/shakespeare_bpe.py --workdir=/tmp/bpe --config.train.steps=500
#   launch/local.sh --extra=cuda --config=configs/shakespeare_char.py:gpu --workdir=/tmp/gpu
#   launch/local.sh --dry_run ...                          # print the commands, run nothing
#
# --extra=cuda|tpu installs JAX for that accelerator (setup.cfg extras).
# Call it from any directory: lm.main runs in yours, so a relative --config, --workdir or
# data path means what it means in your shell; the .venv and the default recipe are the
# repository's (found next to this script).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/options.sh
source "$repo/launch/options.sh"

dry_run=0
extra=""
config="$repo/configs/shakespeare_char.py"
workdir=""
passthrough=()
for arg in "$@"; do
  case "$arg" in
    --dry_run) dry_run=1 ;;
    --extra=*) extra="${arg#--extra=}" ;;
    --config=*) config="${arg#--config=}" ;;
    --workdir=*) workdir="${arg#--workdir=}" ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) passthrough+=("$arg") ;;
  esac
done
if [[ -z "$workdir" ]]; then
  name="$(basename "${config%%:*}" .py)"
  workdir="/tmp/lm/${name}"
fi
package="$repo"
[[ -n "$extra" ]] && package="${repo}[${extra}]"

run() {
  echo "+ $*"
  if [[ "$dry_run" == 0 ]]; then "$@"; fi
}

if [[ ! -x "$repo/.venv/bin/python" || "$dry_run" == 1 ]]; then
  run python3 -m venv "$repo/.venv"
  run "$repo/.venv/bin/pip" install -e "$package"
fi
run "$repo/.venv/bin/python" -m lm.main --config="$config" --workdir="$workdir" "${passthrough[@]}"
