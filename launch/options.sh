# Sourced by the launch scripts: their --help and the errors of their option parsing, one
# wording for all. Each script parses its own options before `--`; what follows `--` goes
# to the lm command it runs.

# The script's header comment (its lines after the shebang, up to the first code line).
print_help() {
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$1"
}

# unknown_option SCRIPT OPTION COMMAND: one error line and exit status 2.
unknown_option() {
  local name; name="$(basename "$1")"
  echo "$name: unknown option $2. Fix: see launch/$name --help; $3 flags go after --." >&2
  exit 2
}

# require_command_flags SCRIPT COUNT COMMAND EXAMPLE: an error unless flags follow `--`.
require_command_flags() {
  if [[ "$2" -eq 0 ]]; then
    echo "$(basename "$1"): no $3 flags after --. Fix: e.g. -- $4" >&2
    exit 2
  fi
}
