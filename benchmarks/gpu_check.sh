#!/usr/bin/env bash
# GPU evidence in one command: parity, sanitizers, compiled Triton kernels and the benchmarks into OUT_DIR
# (at most 8 files), in at most 8 minutes. The logic is in gpu_check.py beside this file.
#
#   bash benchmarks/gpu_check.sh --wheels .whl OUT_DIR     # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR         # on a CPU: every stage's CPU fallback (CI runs this)
#   bash benchmarks/gpu_check.sh --help                    # options, the wheels folder, exit codes
#
# PYTHON picks the interpreter (default python3: the one that has torch on the GPU image).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
