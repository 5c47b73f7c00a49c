#!/usr/bin/env bash
# The gateway under aiperf (an LLM load tool from PyPI), on the same system benchmarks/load.py sets up:
# two real engines, three aliases, a canary in progress, a Celery worker and beat. aiperf sends streamed chat
# completions of the demo's sums to the canary's alias; load.py then compares the requests the gateway
# served with the records written, and prints each process's memory.
#
#   benchmarks/load_aiperf.sh                    # 8 concurrent streams, 1500 requests
#   CONCURRENCY=16 REQUESTS=3000 benchmarks/load_aiperf.sh
#
# aiperf goes into its own virtual environment (var/tools/aiperf), apart from the platform's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOL_VENV=var/tools/aiperf
if [ ! -x "$TOOL_VENV/bin/aiperf" ]; then
  python3 -m venv "$TOOL_VENV"
  "$TOOL_VENV/bin/pip" install --quiet 'aiperf>=0.13,<0.14'
fi

OUT=var/benchmarks/aiperf
mkdir -p "$OUT"
# The demo models answer two-digit sums; anything else is off their training and only wastes the context.
.venv/bin/python -c "
import json, random
rng = random.Random(7)
for _ in range(500):
    print(json.dumps({'text': f'{rng.randint(10, 99)}+{rng.randint(10, 99)}'}))
" > "$OUT/sums.jsonl"

AIPERF="$PWD/$TOOL_VENV/bin/aiperf"
exec .venv/bin/python benchmarks/load.py --external "$AIPERF profile --model adder --endpoint-type chat --streaming \
  --url \"\$LOAD_GATEWAY_URL\" --api-key \"\$LOAD_GATEWAY_KEY\" --tokenizer \"\$LOAD_TOKENIZER\" \
  --input-file $OUT/sums.jsonl --custom-dataset-type single_turn \
  --extra-inputs max_tokens:16 --extra-inputs ignore_eos:true --extra-inputs temperature:0 --use-server-token-count \
  --concurrency ${CONCURRENCY:-8} --request-count ${REQUESTS:-1500} --warmup-request-count 16 \
  --output-artifact-dir $OUT/artifacts" "$@"
