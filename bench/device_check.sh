#!/usr/bin/env bash
# The accelerator check of issue 21, unattended: on a machine with one NVIDIA GPU (or a TPU,
# or only CPUs, which it then measures and says so), with the JAX already installed there and
# no network, it prints the versions that ran, runs the model's numerics checks on the device
# (bench/numerics.py: the fused attention kernel against XLA, forward and gradients, and a
# tiny train step that learns), then bench/accelerator.py for gpt2-small at context 1024 and
# llama-1b at 2048 in bfloat16 with attention "xla" and the platform's fused kernel, and
# prints one table, within 8 minutes on an accelerator (each step gets at most the budget's
# rest; not yet run on a GPU); everything it prints is kept in --out (device_check.log,
# numerics.log, one log per bench run, table.md). Exits 1 if a check or a row failed.
#
#   bash bench/device_check.sh [--wheels=DIR] [--out=DIR] [--quick | --full]
#                              [--gpt2_batch=32] [--llama_batch=8]
#
# It installs nothing from a network and never touches the JAX it finds: it runs `python3`
# (or $PYTHON) with this checkout on PYTHONPATH (lm is not pip-installed), and installs each
# wheel of --wheels=DIR whose package that Python lacks with
# `pip install --no-index --no-deps --target` into a folder under --out, put first on
# PYTHONPATH (without pip, it unpacks the wheel there: they are pure Python).
#
# The wheels folder, prepared once on any machine with network (77 KiB; the model and the
# train step need nothing else beyond JAX, jaxlib, Flax, Optax, Orbax, NumPy and absl-py,
# and Flax brings PyYAML, which ml-collections needs):
#
#   pip download --python-version 3.12 --only-binary=:all: --no-deps -d wheels ml-collections
#
# On a CPU (or with --quick) the two models are shrunk to 2 layers (llama-1b also to width
# 256, 8/2 heads, vocabulary 2,048) at context 128 and 256 with 3 timed steps, so the check
# ends in a few minutes on 2 cores; their rows say so. A CPU has no fused kernel (splash
# needs a TPU, cuDNN a GPU), so there its rows are XLA's only and the numerics check runs
# splash in Pallas interpret mode. --full keeps the real sizes on any platform.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS="" OUT="" SIZE="" GPT2_BATCH=32 LLAMA_BATCH=8
for arg in "$@"; do
  case "$arg" in
    --wheels=*) WHEELS=${arg#--wheels=} ;;
    --out=*) OUT=${arg#--out=} ;;
    --quick) SIZE=quick ;;
    --full) SIZE=full ;;
    --gpt2_batch=*) GPT2_BATCH=${arg#--gpt2_batch=} ;;
    --llama_batch=*) LLAMA_BATCH=${arg#--llama_batch=} ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg. Fix: use --wheels=DIR, --out=DIR, --quick, --full," \
            "--gpt2_batch=N or --llama_batch=N." >&2; exit 2 ;;
  esac
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "--wheels=$WHEELS is not a folder. Fix: pass the folder pip download wrote." >&2; exit 2
fi
OUT=${OUT:-${TMPDIR:-/tmp}/lm_device_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/device_check.log") 2>&1
START=$SECONDS
echo "device check of $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')), $(date -u '+%Y-%m-%d %H:%M UTC'), log in $OUT"

# 1. Wheels for what this Python lacks, into a folder of ours; the rest stays as found.
SITE="$OUT/site-packages"
if [ -n "$WHEELS" ]; then
  for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || { echo "--wheels=$WHEELS holds no .whl files." >&2; exit 2; }
    dist=$(basename "$wheel"); dist=${dist%%-*}
    if found=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null); then
      echo "wheels: $dist $found is installed already; $(basename "$wheel") is not used"
      continue
    fi
    rm -rf "$SITE"/"$dist"* && mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "$wheel" || exit 1
    else
      "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$SITE" || exit 1
    fi
    echo "wheels: installed $(basename "$wheel") into $SITE"
  done
fi
# lm is not installed, so the package_dir mapping of setup.cfg (configs/ as lm.configs, which
# the recipes import) is rebuilt as a folder of links: lm's own files, plus configs.
# Commands run from that folder (it links bench/ and configs/ too), so the checkout's own
# lm/, which Python would find first in the working directory, stays out of the way.
SRC="$OUT/src"
rm -rf "$SRC" && mkdir -p "$SRC/lm" || exit 2
for entry in "$REPO"/lm/*; do ln -s "$entry" "$SRC/lm/"; done
ln -s "$REPO/configs" "$SRC/lm/configs"
ln -s "$REPO/configs" "$REPO/bench" "$SRC/"
export PYTHONPATH="$SITE:$SRC${PYTHONPATH:+:$PYTHONPATH}"
# A GPU's runtime takes 75% of its memory by default; the benches size batches for ~90%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
cd "$SRC" || exit 2

# 2. The versions that run, and the platform.
"$PY" - <<'EOF' || { echo "device_check.sh: the model's imports fail (above). Fix: add the missing package's wheel to --wheels." >&2; exit 1; }
import importlib.metadata as m, platform
import jax, flax, optax, ml_collections, lm.training.trainer, lm.configs.base  # the bench's imports, checked first
def version(dist):
    try:
        return m.version(dist)
    except m.PackageNotFoundError:
        return "absent"
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections", "absl-py")
print(f"python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names))
plugins = [d.metadata["Name"] for d in m.distributions() if d.metadata["Name"] and d.metadata["Name"].startswith(("jax-cuda", "jax_cuda", "libtpu"))]
print(f"jax plugins: {', '.join(sorted(set(plugins))) or 'none'}")
print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} (backend {jax.default_backend()})")
EOF
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null)
case "$BACKEND" in
  gpu|cuda) FUSED=cudnn ;;
  tpu) FUSED=splash ;;
  *) FUSED="" ;;
esac
[ -n "$SIZE" ] || { [ "$BACKEND" = cpu ] && SIZE=quick || SIZE=full; }
[ "$BACKEND" = cpu ] && echo "no accelerator: this check measures the CPU (sizes: $SIZE)"
# Every step below gets at most what is left of the budget (8 minutes on an accelerator, all
# included), so a slow compile costs its own row, not the table.
BUDGET=$([ "$BACKEND" = cpu ] && echo 900 || echo 470)
left() { local n=$((START + BUDGET - SECONDS)); echo $((n < $1 ? (n > 1 ? n : 1) : $1)); }

# 3. Numerics on the device.
echo; echo "== numerics (bench/numerics.py)"
timeout "$(left "$([ "$BACKEND" = cpu ] && echo 300 || echo 120)")" "$PY" bench/numerics.py 2>&1 | tee "$OUT/numerics.log" | grep -v "^WARNING\|^I[0-9]\{4\}\|^W[0-9]\{4\}"
NUMERICS=${PIPESTATUS[0]}

# 4. The benches: one row each.
if [ "$SIZE" = quick ]; then
  GPT2=(--config=configs/gpt2_small.py --preset=gpt2-small --vocab_size=50304 --config.model.num_layers=2
        --seq_len=128 --batch_size=4)
  LLAMA=(--config=configs/llama3_8b.py --preset=llama-1b --config.model.num_layers=2 --config.model.d_model=256
         --config.model.num_heads=8 --config.model.num_kv_heads=2 --config.model.d_ff=1024 --vocab_size=2048
         --seq_len=256 --batch_size=2)
  STEPS=(--steps=3 --warmup=1) LIMIT=300
else
  GPT2=(--config=configs/gpt2_small.py --preset=gpt2-small --vocab_size=50304 --seq_len=1024
        "--batch_size=$GPT2_BATCH")
  LLAMA=(--config=configs/llama3_8b.py --preset=llama-1b --seq_len=2048 "--batch_size=$LLAMA_BATCH")
  STEPS=(--steps=10 --warmup=3) LIMIT=150
fi
HEADER="" ROWS=()
for model in gpt2 llama; do
  for attention in xla ${FUSED:-none}; do
    if [ "$attention" = none ]; then
      ROWS+=("| $model: no fused kernel on $BACKEND (splash needs a TPU, cuDNN an NVIDIA GPU) |")
      continue
    fi
    echo; echo "== $model, attention $attention"
    if [ "$model" = gpt2 ]; then flags=("${GPT2[@]}"); else flags=("${LLAMA[@]}"); fi
    log="$OUT/${model}_${attention}.log"
    limit=$(left "$LIMIT")
    timeout "$limit" "$PY" bench/accelerator.py "${flags[@]}" --dtype=bfloat16 "--attention=$attention" \
      "${STEPS[@]}" >"$log" 2>&1
    rc=$?
    grep -v "^WARNING\|^I[0-9]\{4\}\|^W[0-9]\{4\}" "$log" | tail -4
    if [ $rc -eq 0 ] && grep -q "^| device" "$log"; then
      HEADER=$(grep "^| device" "$log" | tail -1)
      ROWS+=("$(tail -1 "$log")")
    else
      why=$([ $rc -eq 124 ] && echo "stopped at ${limit} s, the budget's rest" || tail -1 "$log" | cut -c1-160)
      ROWS+=("| $model, attention $attention: FAILED (exit $rc: $why; see $log) |")
    fi
  done
done

# 5. One table.
echo; echo "== accelerator table ($SIZE sizes; $(date -u +%Y-%m-%d))"
{
  echo "${HEADER:-| device | jax | model | params | context | batch | attention | tokens/s | ms/step | MFU | MFU against | peak memory |}"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/table.md"
echo
echo "numerics: $([ "$NUMERICS" -eq 0 ] && echo passed || echo "FAILED (exit $NUMERICS)"); $((SECONDS - START)) s in all; log: $OUT/device_check.log"
FAILED_ROWS=$(printf '%s\n' "${ROWS[@]}" | grep -c "FAILED")
[ "$NUMERICS" -eq 0 ] && [ "$FAILED_ROWS" -eq 0 ]
