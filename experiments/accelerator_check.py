"""The accelerator check: training speed, MFU and memory of the large configs on the present device, in one table.

    bash experiments/accelerator_check.sh                  # the prepared run (about 8 minutes on one H100/H200)
    python -m experiments.accelerator_check [--budget-s 420] [--cases dit-b2,ddpm] [--steps 10] [--tiny]
        [--peak-tflops 989] [--out table.md]

Cases, in order of priority (cases still waiting when --budget-s has passed are listed as skipped):
  DiT-B/2 and DiT-XL/2 at 256px (32x32x4 latents, batch 256; the trainer's own step: hybrid loss, AdamW, EMA),
  the DDPM CIFAR-10 U-Net (35.7M parameters, batch 128), each in bfloat16 and float32, without and with full
  remat; and Stable Diffusion 1.5's U-Net at 512px (64x64x4 latents, batch 8, bfloat16, a frozen 77-token text
  context; the text encoder and autoencoder are not part of the step).

Columns: steps/s and images/s (median of --steps timed steps after 2 warm-up steps), model TFLOP per step (XLA's
cost analysis of the compiled step without remat, so the remat rows count the model's FLOPs, not the
recomputation), MFU = model FLOP/s / the device's dense peak for the compute dtype (experiments/train_throughput.py's
table; float32 against TF32 on NVIDIA), and the compiled peak memory (arguments + outputs + temporaries - donated
aliases, from memory_analysis()). With `--tiny` every network is cut to a few blocks on 8x8 inputs: the CPU test of
this script (tests/test_accelerator_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3


@dataclasses.dataclass
class Case:
    key: str  # e.g. dit-xl2-bfloat16-full
    network: str  # the row's name
    kind: str  # 'trainer' (a config's own step) or 'sd' (the standalone SD U-Net step)
    config: str
    overrides: tuple
    batch: int
    dtype: str
    remat: str


DIT = "configs/dit_xl2_imagenet256.py"
LATENT_DIT = (("latent.autoencoder", ""), ("data.image_size", "32"), ("data.channels", "4"))
NETWORKS = {
    "dit-b2": ("DiT-B/2 256px", "trainer", DIT, (("model.variant", "DiT-B/2"),) + LATENT_DIT, 256),
    "ddpm": ("DDPM CIFAR-10 U-Net", "trainer", "configs/ddpm_cifar10.py", (), 128),
    "dit-xl2": ("DiT-XL/2 256px", "trainer", DIT, (("model.variant", "DiT-XL/2"),) + LATENT_DIT, 256),
    "sd15": ("SD 1.5 U-Net 512px", "sd", "configs/sd15.py", (), 8),
}
TINY = {
    "dit-b2": (("model.variant", ""), ("model.depth", "2"), ("model.hidden_size", "32"), ("model.num_heads", "2"))
    + (("model.patch_size", "2"), ("data.image_size", "8")),
    "dit-xl2": (("model.variant", ""), ("model.depth", "2"), ("model.hidden_size", "64"), ("model.num_heads", "2"))
    + (("model.patch_size", "2"), ("data.image_size", "8")),
    "ddpm": (("model.ch", "16"), ("model.ch_mult", "(1, 2)"), ("model.num_res_blocks", "1"))
    + (("model.attn_resolutions", "(4,)"), ("model.norm_groups", "8"), ("data.image_size", "8")),
    "sd15": (
        ("model.block_out_channels", "(8, 16)"),
        ("model.cross_attention_levels", "(True, False)"),
        ("model.norm_num_groups", "4"),
        ("model.attention_head_dim", "2"),
        ("model.cross_attention_dim", "8"),
        ("model.layers_per_block", "1"),
        ("data.image_size", "64"),
    ),
}


def cases(tiny: bool = False) -> List[Case]:
    """Every case, most wanted first: bf16 without remat, then with remat, then float32, SD 1.5 after the DiTs."""
    order = [
        ("dit-b2", "bfloat16", "none"),
        ("ddpm", "bfloat16", "none"),
        ("dit-xl2", "bfloat16", "none"),
        ("dit-xl2", "bfloat16", "full"),
        ("sd15", "bfloat16", "none"),
        ("dit-b2", "bfloat16", "full"),
        ("ddpm", "bfloat16", "full"),
        ("dit-b2", "float32", "none"),
        ("ddpm", "float32", "none"),
        ("dit-xl2", "float32", "none"),
        ("dit-xl2", "float32", "full"),
        ("dit-b2", "float32", "full"),
        ("ddpm", "float32", "full"),
    ]
    out = []
    for net, dtype, remat in order:
        name, kind, config, overrides, batch = NETWORKS[net]
        if tiny:
            overrides, batch = overrides + TINY[net], 4
        out.append(Case(f"{net}-{dtype}-{remat}", name, kind, config, overrides, batch, dtype, remat))
    return out


def sd_program(config, batch: int):
    """(init(key) -> state, step(state, batch) -> (state, metrics), abstract batch) of SD's U-Net, not jitted: eps
    loss on latents with a text context, AdamW + EMA through the trainer's update (research.train.state)."""
    import jax
    import jax.numpy as jnp

    from research.cond import Cond
    from research.diffusion import gaussian
    from research.sampling import schedule_from_config
    from research.shapes import build_network, init_net_params, model_input_shape
    from research.train.state import apply_gradients, init_train_state, make_optimizer

    unet = build_network(config)
    schedule = schedule_from_config(config.diffusion)
    txs = {"net": make_optimizer(config.optim, config.train.num_steps)}
    height, width, channels = model_input_shape(config)

    def loss_fn(params, b, rng):
        t_rng, n_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, (b["image"].shape[0],), 0, schedule.num_steps)
        noise = jax.random.normal(n_rng, b["image"].shape)
        x_t = gaussian.q_sample(schedule, b["image"], t, noise)
        out = unet.apply({"params": params}, x_t, t, Cond(text=b["text"]), train=True)
        return jnp.mean((out.astype(jnp.float32) - noise) ** 2)

    def init(key):
        return init_train_state({"net": init_net_params(unet, config, key)}, txs, config.seed)

    def step(state, b):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params["net"], b, rng)
        return apply_gradients(state, {"net": grads}, txs, config.train.ema_decay), {"loss": loss}

    batch_arrays = {
        "image": jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32),
        "text": jax.ShapeDtypeStruct((batch, 77, int(config.model.cross_attention_dim)), jnp.float32),
    }
    return init, step, batch_arrays


def sd_config(case: Case, remat: str = "none"):
    """configs/sd15.py as written (its autoencoder and text encoder runs are not needed: the U-Net sees the 64x64x4
    latents of the 512px images) with the case's overrides."""
    from research.config import apply_overrides, load_config_file

    overrides = list(case.overrides) + [
        ("model.dtype", case.dtype),
        ("train.batch_size", str(case.batch)),
    ]
    config = apply_overrides(load_config_file(os.path.join(ROOT, case.config)), overrides)
    with config.unlocked():
        config.model.remat = remat
    return config


def trainer_config(case: Case, remat: str = "none", extra=()):
    """The validated config of a 'trainer' case on synthetic data of the case's shape."""
    from research.tasks import get_config

    overrides = list(case.overrides) + [
        ("model.dtype", case.dtype),
        ("model.remat", remat),
        ("train.batch_size", str(case.batch)),
        ("train.progress", "false"),
        ("data.name", "synthetic"),
        *extra,
    ]
    return get_config(os.path.join(ROOT, case.config), overrides)


def image_batch(config, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    d = config.data
    return {
        "image": jax.ShapeDtypeStruct((batch, d.image_size, d.image_size, d.channels), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }


def _program(case: Case, remat: str):
    """(init, jitted step, abstract batch) of a case with a remat policy, on one device."""
    import jax

    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer

    if case.kind == "sd":
        init, step, batch = sd_program(sd_config(case, remat), case.batch)
        return jax.jit(init), jax.jit(step, donate_argnums=0), batch
    config = trainer_config(case, remat)
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    return trainer.init, trainer.step, image_batch(config, case.batch)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _peak_bytes(compiled) -> Optional[int]:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def run_case(case: Case, steps: int, peak_tflops: Optional[float]) -> dict:
    """Compile, time and measure one case -> a row of the table."""
    import jax
    import numpy as np

    t0 = time.time()
    init, step, batch = _program(case, case.remat)
    state = init(jax.random.PRNGKey(0))
    arrays = {
        k: (
            jax.random.randint(jax.random.PRNGKey(1), v.shape, 0, 10).astype(v.dtype)
            if v.dtype == np.int32
            else jax.random.normal(jax.random.PRNGKey(1), v.shape, v.dtype)
        )
        for k, v in batch.items()
    }
    compiled = step.lower(state, arrays).compile()
    flops = _flops(compiled)
    if case.remat != "none":  # the model's FLOPs: the same step without recomputation
        _, plain, _ = _program(case, "none")
        flops = _flops(plain.lower(state, arrays).compile())
    peak_mem = _peak_bytes(compiled)
    compile_s = time.time() - t0
    times = []
    for i in range(2 + steps):
        start = time.time()
        state, metrics = compiled(state, arrays)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.time() - start)
    step_s = statistics.median(times)
    from experiments.train_throughput import peak_for

    device = jax.devices()[0]
    peak = peak_tflops or peak_for(device.device_kind, case.dtype)
    mfu = flops / step_s / (peak * 1e12) if peak else None
    return {
        "case": case.key,
        "network": case.network,
        "dtype": case.dtype,
        "remat": case.remat,
        "batch": case.batch,
        "steps_per_s": 1.0 / step_s,
        "images_per_s": case.batch / step_s,
        "tflop_per_step": flops / 1e12,
        "mfu": mfu,
        "peak_gib": None if peak_mem is None else peak_mem / GIB,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
    }


def render(rows: List[dict], skipped: List[str], device: str) -> str:
    lines = [
        f"Device: {device}",
        "",
        "| network | dtype | remat | batch | steps/s | images/s | model TFLOP/step | MFU | compiled peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['network']} | {r['dtype']} | {r['remat']} | {r['batch']} | {r['steps_per_s']:.3f} | "
            f"{r['images_per_s']:.1f} | {r['tflop_per_step']:.4g} | {mfu} | {mem} |"
        )
    if skipped:
        lines += ["", f"Skipped (time budget): {', '.join(skipped)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    p.add_argument("--cases", default="", help="comma-separated case-key prefixes (e.g. dit-xl2,sd15); all if empty")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="a few blocks on 8x8 inputs (the CPU test)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not in the table")
    p.add_argument("--out", default="", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    import jax

    wanted = [c for c in args.cases.split(",") if c]
    todo = [c for c in cases(args.tiny) if not wanted or any(c.key.startswith(w) for w in wanted)]
    if not todo:
        p.error(f"--cases {args.cases!r} matches none of {[c.key for c in cases()]}")
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    start, rows, skipped = time.time(), [], []
    for case in todo:
        if time.time() - start > args.budget_s:
            skipped.append(case.key)
            continue
        print(f"{case.key} ...", flush=True)
        try:
            rows.append(run_case(case, args.steps, args.peak_tflops))
        except Exception as e:  # out of memory on a small device: report it and go on
            print(f"{case.key}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            skipped.append(f"{case.key} (failed)")
    table = render(rows, skipped, device)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
