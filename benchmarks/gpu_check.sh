#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py says what it runs): from a fresh clone with
# ../shared beside it, under 8 minutes on one H100 or H200. Creates .venv on first use, as
# `make test` does. Writes gpu-check.md (or --out) to paste into docs/benchmarks.md.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: every section at tiny sizes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory .venv/.installed >&2
exec .venv/bin/python benchmarks/gpu_check.py "$@"
