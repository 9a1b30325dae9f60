#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, put the code on every host,
# install, and run the same lm.main command on all hosts at once. JAX's multi-controller
# runtime connects the hosts (lm.main --distributed); every host reads its own rows.
#
#   launch/tpu_pod.sh --name=lm-v5e --zone=us-west4-a --accelerator_type=v5litepod-16 \
#       -- --config=configs/shakespeare_char.py:gpu --workdir=/mnt/bucket/runs/v5e
#
# Options (before `--`; what follows `--` goes to lm.main):
#   --name=NAME                 TPU VM name (required)
#   --zone=ZONE                 (required)
#   --accelerator_type=TYPE     e.g. v4-32, v5litepod-16, v5p-32, v6e-16 (default v5litepod-16)
#   --version=RUNTIME           TPU software version (default v2-alpha-tpuv5-lite)
#   --project=PROJECT           default: gcloud's configured project
#   --queued                    request the slice through queued resources and wait for it
#   --spot                      spot capacity
#   --repo=URL [--branch=B]     clone the code from git on every host (default: copy this
#                               checkout, as `git archive HEAD`, with `gcloud ... scp`)
#   --dry_run                   print every command, run none (assumes the slice does not exist yet)
#   --delete                    delete the slice after the run
# Call it from any directory. The hosts run lm.main in their copy of the repository (~/lm),
# so the --config you give (relative to your directory, as in your shell) must be a file of
# this checkout, committed (the hosts get `git archive HEAD`, or the --repo branch): it is
# passed on as its path in the repository; a config outside the checkout is refused, since
# the hosts cannot read it. Other paths in the flags (--workdir, data files) are used on the
# hosts as given (a relative one means ~/lm/...): make them absolute paths on a file system
# every host shares.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
# shellcheck source=launch/options.sh
source "$repo/launch/options.sh"

name="" zone="" accelerator="v5litepod-16" version="v2-alpha-tpuv5-lite" project=""
queued=0 spot=0 repo_url="" branch="main" dry_run=0 delete=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --repo=*) repo_url="${1#*=}" ;;
    --branch=*) branch="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --delete) delete=1 ;;
    --) shift; break ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) unknown_option "$0" "$1" lm.main ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --name and --zone are required. Fix: e.g. --name=lm-v5e --zone=us-west4-a" >&2
  exit 2
fi
require_command_flags "$0" $# lm.main "--config=configs/shakespeare_char.py:gpu --workdir=/mnt/bucket/run"

# The config as its path in the repository (keeping its `:argument`), for the hosts' copy.
config_in_repo() {
  local file="${1%%:*}" argument="" dir
  [[ "$1" == *:* ]] && argument=":${1#*:}"
  if ! [[ -f "$file" ]] || ! dir="$(cd "$(dirname "$file")" && pwd -P)"; then
    echo "tpu_pod.sh: --config=$file: no such file (from $PWD). Fix: give the recipe's path from this directory, e.g. --config=$repo/configs/shakespeare_char.py." >&2
    exit 2
  fi
  case "$dir/" in
    "$repo"/*) relative="${dir#"$repo"}/$(basename "$file")"; relative="${relative#/}" ;;
    *) echo "tpu_pod.sh: --config=$file is outside the repository ($repo), so the TPU hosts cannot read it. Fix: move it into the repository (e.g. configs/) and commit it." >&2
       exit 2 ;;
  esac
  if [[ -z "$repo_url" ]] && ! git -C "$repo" cat-file -e "HEAD:$relative" 2>/dev/null; then
    echo "tpu_pod.sh: --config=$file is not committed, and the hosts get this checkout's HEAD (git archive). Fix: git add $relative && git commit." >&2
    exit 2
  fi
  if [[ -z "$repo_url" ]] && ! git -C "$repo" diff --quiet HEAD -- "$relative"; then
    echo "# note: $relative has uncommitted changes; the hosts run its committed version" >&2
  fi
  config="$relative$argument"
}
main_args=() config_next=0
for arg in "$@"; do
  if [[ "$config_next" == 1 ]]; then config_in_repo "$arg"; arg="$config"; config_next=0
  elif [[ "$arg" == --config=* ]]; then config_in_repo "${arg#--config=}"; arg="--config=$config"
  elif [[ "$arg" == --config ]]; then config_next=1
  fi
  main_args+=("$arg")
done

# Hosts of a slice: 4 chips per host (v4 and v5p count 2 TensorCores per chip in their names).
hosts_of() {
  local generation="${1%-*}" size="${1##*-}"
  case "$generation" in
    v4|v5p) echo $(( size / 2 > 4 ? size / 8 : 1 )) ;;
    v5litepod|v5e|v6e) echo $(( size > 8 ? size / 4 : 1 )) ;;
    *) echo "?" ;;
  esac
}

gcloud_tpu=(gcloud compute tpus)
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
quote() {  # shell words, quoted only where needed, so printed commands read as typed
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {
  echo "+ $(quote "$@")"
  if [[ "$dry_run" == 0 ]]; then "$@"; fi
}
on_all_hosts() {
  run "${gcloud_tpu[@]}" tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"
}

echo "# ${accelerator}: $(hosts_of "$accelerator") hosts, each running the same command"

# 1. The slice.
if [[ "$dry_run" == 1 ]] || ! "${gcloud_tpu[@]}" tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
  extra=()
  [[ "$spot" == 1 ]] && extra+=(--spot)
  if [[ "$queued" == 1 ]]; then
    run "${gcloud_tpu[@]}" queued-resources create "${name}-request" "${common[@]}" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${extra[@]}"
    echo "+ wait until: $(quote "${gcloud_tpu[@]}" queued-resources describe "${name}-request" "${common[@]}" \
      --format='value(state.state)') prints ACTIVE"
    if [[ "$dry_run" == 0 ]]; then
      until [[ "$("${gcloud_tpu[@]}" queued-resources describe "${name}-request" "${common[@]}" \
                 --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
    fi
  else
    run "${gcloud_tpu[@]}" tpu-vm create "$name" "${common[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${extra[@]}"
  fi
fi

# 2. The code, on every host.
if [[ -n "$repo_url" ]]; then
  on_all_hosts "if [ -d lm ]; then cd lm && git fetch origin && git checkout $branch && git pull; else git clone --branch $branch $repo_url lm; fi"
else
  run git -C "$repo" archive --format=tar.gz -o /tmp/lm-code.tar.gz HEAD
  run "${gcloud_tpu[@]}" tpu-vm scp /tmp/lm-code.tar.gz "$name":lm-code.tar.gz "${common[@]}" --worker=all
  on_all_hosts "mkdir -p lm && tar -xzf lm-code.tar.gz -C lm"
fi

# 3. Install, 4. run the same command on all hosts.
on_all_hosts "cd lm && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
on_all_hosts "cd lm && .venv/bin/python -m lm.main --distributed $(quote "${main_args[@]}")"

if [[ "$delete" == 1 ]]; then
  run "${gcloud_tpu[@]}" tpu-vm delete "$name" "${common[@]}" --quiet
fi
