"""Training throughput of any config on synthetic data: steps/s, images/s and model FLOPs utilisation.

    python -m experiments.train_throughput --config configs/ddpm_cifar10.py [--dtype bfloat16] [--steps 50]
        [--batch-size 128] [--peak-tflops 989] [--config.a.b=v ...]

Uses the real train step (jit + shardings over all devices, optimizer, EMA) on `data.name=synthetic` images
of the config's shape. FLOPs per step come from XLA's cost analysis of the compiled step (forward, backward
and update; a multiply-add counts as 2). MFU = achieved FLOP/s / (devices * peak FLOP/s); the peak is taken
from --peak-tflops or from the small table below for known accelerators, and omitted on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

# Dense peak TFLOP/s per device, from the vendors' data sheets (no sparsity). fp32 on NVIDIA uses TF32 matmuls,
# which is what XLA does for float32 dots at default precision.
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 494.0,
    ("H200", "bfloat16"): 989.0,
    ("H200", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5p", "bfloat16"): 459.0,
}


def peak_for(device_kind: str, dtype: str):
    for (name, dt), value in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower() and dt == dtype:
            return value
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from research.config import ConfigError, parse_config_args
    from research.tasks import get_config

    path, overrides, rest = parse_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(rest)
    if path is None:
        p.error("--config is required")
    overrides = list(overrides) + [("data.name", "synthetic"), ("train.progress", "false")]
    if args.dtype:
        overrides.append(("model.dtype", args.dtype))
    if args.batch_size:
        overrides.append(("train.batch_size", str(args.batch_size)))
    try:
        config = get_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    from research.data import make_train_iterator
    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer

    trainer = build_trainer(config)
    batch_size = config.train.batch_size
    it = make_train_iterator(
        config.data,
        global_batch_size=batch_size,
        seed=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = [
        mesh_lib.global_batch({"image": b["image"], "label": b["label"]}, trainer.batch_sharding)
        for b in (next(it) for _ in range(2))
    ]
    t0 = time.time()
    state = trainer.init(jax.random.PRNGKey(0))
    compiled = trainer.step.lower(state, batches[0]).compile()
    compile_s = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = float(cost.get("flops", 0.0))

    times = []
    for i in range(args.warmup + args.steps):
        t = time.time()
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.time() - t)
    step_s = statistics.median(times)
    dev = jax.devices()[0]
    dtype = str(config.model.dtype)
    peak = args.peak_tflops or peak_for(dev.device_kind, dtype)
    achieved = step_flops / step_s
    print(f"config: {path}  model dtype: {dtype}  devices: {jax.device_count()} x {dev.device_kind}")
    print(f"batch: {batch_size}  compile: {compile_s:.1f}s  step FLOPs: {step_flops / 1e12:.3f} TFLOP")
    print(f"median step: {step_s * 1e3:.1f} ms  steps/s: {1 / step_s:.2f}  images/s: {batch_size / step_s:.1f}")
    print(
        f"achieved: {achieved / 1e12:.2f} TFLOP/s"
        + (
            f"  MFU: {100 * achieved / (peak * 1e12 * jax.device_count()):.1f}% (peak {peak:g} TFLOP/s per device)"
            if peak
            else "  MFU: n/a (pass --peak-tflops)"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
