"""Per-device memory of a training step under FSDP, from the compiled program: DiT-XL/2 and Stable Diffusion 1.5's
U-Net, one device against N (simulated CPU devices work: nothing is allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m experiments.fsdp_memory [--devices 8] [--networks dit-xl2,sd15] [--batch 8] [--dtype bfloat16]

For each network the training step (the trainer's own for DiT-XL/2: hybrid loss, AdamW, EMA; for the SD U-Net the
step of experiments/accelerator_check.py) is jitted twice, on one device with every leaf replicated and on a
(data = N) mesh with train.sharding_rules=(('.*', 'fsdp'),), lowered from abstract inputs and compiled. Reported per
device: the state the sharding rules assign (parameters + EMA + Adam moments, research.train.mesh), the compiled
program's argument bytes (state + batch) and temporaries (memory_analysis()), and the ratio of the one-device
argument bytes to the N-device ones. Leaves under train.fsdp_min_size (2^18 elements: biases, norms) stay
replicated, so the ratio is a little under N.
"""

from __future__ import annotations

import argparse
import sys
import time

GIB = 1024**3
FSDP = ((".*", "fsdp"),)  # train.sharding_rules of the N-device runs


def _compiled_trainer(case, devices: int, batch: int):
    import jax

    from experiments.accelerator_check import image_batch, trainer_config
    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer

    rules = [("train.sharding_rules", repr(FSDP))] if devices > 1 else []
    config = trainer_config(case, "none", [("train.num_devices", str(devices)), *rules])
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:devices]))
    abstract = image_batch(config, batch)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding) for k, v in abstract.items()}
    compiled = trainer.step.lower(trainer.abstract_state_sharded(), batch_in).compile()
    return trainer.abstract_state, trainer.state_sharding, compiled


def _compiled_sd(case, devices: int, batch: int):
    import jax

    from experiments.accelerator_check import sd_config, sd_program
    from research.train import mesh as mesh_lib

    init, step, abstract_batch = sd_program(sd_config(case), batch)
    mesh = mesh_lib.make_mesh(1, jax.devices()[:devices])
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = mesh_lib.state_shardings(mesh, abstract, FSDP if devices > 1 else ())
    batch_sh = mesh_lib.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in abstract_batch.items()}
    return abstract, state_sh, jitted.lower(state_in, batch_in).compile()


def measure(network: str, devices: int, batch: int, dtype: str) -> dict:
    from experiments.accelerator_check import cases
    from research.train import mesh as mesh_lib

    case = next(c for c in cases() if c.key == f"{network}-{dtype}-none")
    t0 = time.time()
    build = _compiled_sd if case.kind == "sd" else _compiled_trainer
    abstract, shardings, compiled = build(case, devices, batch)
    m = compiled.memory_analysis()
    return {
        "network": case.network,
        "devices": devices,
        "state": mesh_lib.state_bytes_per_device(abstract, shardings),
        "arguments": m.argument_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "compile_s": time.time() - t0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--networks", default="dit-xl2,sd15")
    p.add_argument("--batch", type=int, default=8, help="global batch (small: the state is what is measured)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    import jax

    if jax.device_count() < args.devices:
        p.error(
            f"{jax.device_count()} devices visible; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}"
        )
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, compute {args.dtype}")
    print(
        "| network | devices | state GiB/device | compiled arguments GiB/device | compiled temp GiB | "
        "argument ratio | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for network in args.networks.split(","):
        one = measure(network, 1, args.batch, args.dtype)
        for r in (one, measure(network, args.devices, args.batch, args.dtype)):
            print(
                f"| {r['network']} | {r['devices']} | {r['state'] / GIB:.3f} | {r['arguments'] / GIB:.3f} | "
                f"{r['temp'] / GIB:.3f} | {one['arguments'] / r['arguments']:.2f}x | {r['compile_s']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
