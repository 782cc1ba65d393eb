#!/usr/bin/env bash
# Set up .venv and run the demo: train a tiny model on real anatomy, segment, report Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/cotexnet demo "$@"
