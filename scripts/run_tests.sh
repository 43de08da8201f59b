#!/usr/bin/env bash
# Run the test suite in .venv; pytest exit code 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh || exit 1
export DS_ACCELERATOR=cpu WANDB_MODE=disabled GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "no tests were collected" >&2
    exit 1
fi
exit $rc
