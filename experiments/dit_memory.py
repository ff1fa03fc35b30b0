"""Memory of one DiT training step under each rematerialisation policy of the blocks (model.remat).

    PYTHONPATH=. python -m experiments.dit_memory [--variant DiT-XL/2] [--batch 256] [--dtype float32]

The step is the trainer's own (research.train.loop.build_trainer: hybrid loss, AdamW, EMA, donated state)
for configs/dit_xl2_imagenet256.py, lowered from abstract inputs and compiled for the default backend on one
device; nothing is allocated. Two measurements:
  compiled   the compiled program's memory_analysis(): state = parameters + EMA + AdamW moments (the donated
             arguments), temp = everything else the program allocates, peak = arguments + outputs + temp -
             aliased. This is what the backend's compiler decided, fusion and scheduling included.
  saved      the activations the backward pass needs, as JAX hands them to the compiler (the residuals of
             jax.vjp of the loss, arguments excluded): backend-independent, before any fusion.
On CPU the compiled figures barely move with remat, although the recomputation stays in the compiled program
(tests/test_remat.py counts its extra dots): XLA's CPU scheduler does not turn it into a lower peak. The saved
figures show what remat buys on a backend whose scheduler does (GPU, TPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.extend.core
import jax.numpy as jnp

from research.config import apply_overrides
from research.sampling import schedule_from_config
from research.shapes import build_network
from research.tasks import get_config
from research.tasks.diffusion import make_loss_fn
from research.train import mesh as mesh_lib
from research.train.loop import build_trainer

CONFIG = "configs/dit_xl2_imagenet256.py"
GIB = 1024**3


def _config(variant: str, batch: int, remat: str, dtype: str):
    return apply_overrides(
        get_config(CONFIG),
        [
            ("model.variant", variant),
            ("model.remat", remat),
            ("model.dtype", dtype),
            ("train.batch_size", str(batch)),
        ],
    )


def _abstract_batch(config, batch: int, sharding=None) -> dict:
    d = config.data
    return {
        "image": jax.ShapeDtypeStruct((batch, d.image_size, d.image_size, d.channels), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding),
    }


def saved_activation_bytes(variant: str, batch: int, remat: str, dtype: str) -> int:
    """Bytes of the residuals jax.vjp keeps from the forward pass of the training loss for the backward
    pass, not counting its arguments (parameters and batch), each residual counted once."""
    config = _config(variant, batch, remat, dtype)
    model = build_network(config)
    loss_fn = make_loss_fn(model, schedule_from_config(config.diffusion), config)
    trainer_params = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1])).abstract_state.params["net"]

    def loss(params, batch_):
        return loss_fn(params, batch_, jax.random.PRNGKey(0), None)[0]

    closed = jax.make_jaxpr(lambda p, b: jax.vjp(loss, p, b)[1])(trainer_params, _abstract_batch(config, batch))
    inputs = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
    residuals = {id(v): v for v in closed.jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs}
    return sum(v.aval.size * v.aval.dtype.itemsize for v in residuals.values())


def step_memory(variant: str, batch: int, remat: str, dtype: str) -> dict:
    """memory_analysis() of the compiled training step, in bytes, plus the compile time in seconds."""
    config = _config(variant, batch, remat, dtype)
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    batch_abstract = _abstract_batch(config, batch, trainer.batch_sharding)
    start = time.time()
    compiled = trainer.step.lower(trainer.abstract_state_sharded(), batch_abstract).compile()
    seconds = time.time() - start
    m = compiled.memory_analysis()
    state = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trainer.abstract_state))
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "state": state,
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "peak": peak,
        "compile_s": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    print(
        f"{args.variant}, batch {args.batch}, compute {args.dtype}, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind})"
    )
    print("| remat | state GiB | saved activations GiB | compiled temp GiB | compiled peak GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for remat in ("none", "full", "dots"):
        saved = saved_activation_bytes(args.variant, args.batch, remat, args.dtype)
        r = step_memory(args.variant, args.batch, remat, args.dtype)
        print(
            f"| {remat} | {r['state'] / GIB:.2f} | {saved / GIB:.2f} | {r['temp'] / GIB:.2f} "
            f"| {r['peak'] / GIB:.2f} | {r['compile_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
