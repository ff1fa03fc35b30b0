#!/usr/bin/env bash
# The accelerator check of the scale work: one prepared run, about 8 minutes on one H100 / H200, one table.
#
#   bash experiments/accelerator_check.sh [OUT_DIR]        (default: runs/accelerator_check)
#
# Prints the device, then experiments/accelerator_check.py's table (steps/s, images/s, MFU, compiled peak memory of
# DiT-B/2, DiT-XL/2, the DDPM CIFAR-10 U-Net and the SD 1.5 U-Net), and writes it to OUT_DIR/table.md with the
# full log in OUT_DIR/log.txt. Run it from the repository root after README command 2's install (pip install -e .
# with a CUDA or TPU jax). Cases that do not fit in the time budget (--budget-s, 420 s by default) are listed as
# skipped; pass more arguments after OUT_DIR to change it, e.g. `bash experiments/accelerator_check.sh out --budget-s 900`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/accelerator_check}"
shift || true
mkdir -p "$out"
# XLA's latency-hiding scheduler overlaps the FSDP collectives with compute on GPUs; harmless on one device.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
  python -m experiments.accelerator_check --out "$out/table.md" "$@"
} 2>&1 | tee "$out/log.txt"
