"""Stable Diffusion 1.5 text-to-image: peak memory of the generation programs and time per denoising step.

    python -m experiments.sd_memory [--size 512] [--steps 25] [--dtypes float32,bfloat16] [--time-steps 2]
        [--skip-timing]

The three programs research.generate compiles for one image (batch 1) with classifier-free guidance, built on
the released architectures (configs/sd15.py's U-Net, CLIP ViT-L/14's text tower, the f8 VAE) with random weights
(no download; memory and speed do not depend on the values):
  text   the text encoder on [2, 77] tokens (prompt and negative prompt),
  loop   the whole DPM-Solver++ 2M loop of --steps steps as one lax.scan, the U-Net on the batch [uncond; cond],
  decode the VAE decoder of the [1, size/8, size/8, 4] latents.
For each dtype each program is lowered from abstract inputs and compiled, and XLA's memory analysis is printed:
arguments (the weights and inputs), temporaries (the peak of intermediate buffers), output, and their sum, the
program's peak device memory. Parameters stay float32 in the bfloat16 runs (as research.generate keeps them),
so only the computation and activations change. Unless --skip-timing, the loop is then run with random weights
on --time-steps steps (after a compile and warm-up call on the same shapes) and the wall time per denoising step
on this machine's devices is printed. Figures go to stdout and, as JSON, to --out (default
runs/sd_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "arguments_gib": m.argument_size_in_bytes / 2**30,
        "temporaries_gib": m.temp_size_in_bytes / 2**30,
        "output_gib": m.output_size_in_bytes / 2**30,
    }
    out["peak_gib"] = out["arguments_gib"] + out["temporaries_gib"] + out["output_gib"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--out", default="runs/sd_memory.json")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from research.generate import _PLAN_ROWS, _frozen, _loop_program, _text_program, _vae_program, sampling_plan
    from research.models.clip import CLIPTextTransformer, stable_diffusion_text_encoder
    from research.models.cond_unet import CondUNet, stable_diffusion_unet
    from research.models.vae import AutoencoderKL
    from research.pretrained.convert_vae import model_fields

    unet_fields = {k: v for k, v in stable_diffusion_unet("1").items() if k != "dtype"}
    unet_fields["out_channels"] = 4
    text_fields = stable_diffusion_text_encoder("1")
    vae_fields = {
        k: v
        for k, v in model_fields(
            dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32)
        ).items()
        if k not in ("name", "dtype")
    }
    vae_fields["out_channels"] = 3
    scheduler = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading",
    )  # fmt: skip
    h = args.size // 8
    key = jax.random.PRNGKey(0)
    unet_params = jax.eval_shape(
        lambda: CondUNet(**unet_fields).init(
            key, jnp.zeros((1, h, h, 4)), jnp.zeros((1,)), _text_cond(jnp.zeros((1, 77, 768)))
        )["params"]
    )
    text_params = jax.eval_shape(lambda: CLIPTextTransformer(**text_fields).init(key, jnp.zeros((1, 77), jnp.int32)))
    vae_params = jax.eval_shape(lambda: AutoencoderKL(**vae_fields).init(key, jnp.zeros((1, 64, 64, 3))))["params"]

    def plan_rows(steps):
        plan = sampling_plan(scheduler, "dpmpp_2m", steps)
        rows = {"t": np.asarray(plan.timesteps, np.float32), "i": np.arange(len(plan.timesteps))}
        rows.update({k: np.asarray(getattr(plan, k)) for k in _PLAN_ROWS})
        return rows

    spec = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    results = {"size": args.size, "steps": args.steps, "device": str(jax.devices()[0].device_kind), "programs": {}}
    for dtype in args.dtypes.split(","):
        loop = _loop_program(_frozen(unet_fields), dtype, "dpmpp_2m", True, False, None, False)
        text = _text_program(_frozen(text_fields), dtype, -1)
        decode = _vae_program(_frozen(vae_fields), dtype)
        x = jax.ShapeDtypeStruct((1, h, h, 4), jnp.float32)
        cond = jax.ShapeDtypeStruct((2, 77, 768), jnp.float32)
        keys = jax.ShapeDtypeStruct((1, 2), jnp.uint32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        rows = spec(plan_rows(args.steps))
        t0 = time.time()
        compiled = {
            "text": text.lower(spec(text_params["params"]), jax.ShapeDtypeStruct((2, 77), jnp.int32)).compile(),
            "loop": loop.lower(spec(unet_params), x, cond, rows, keys, scalar, scalar).compile(),
            "decode": decode.lower(spec(vae_params), x, scalar).compile(),
        }
        compile_s = time.time() - t0
        entry = {name: _memory(c) for name, c in compiled.items()}
        entry["compile_seconds"] = compile_s
        for name in ("text", "loop", "decode"):
            m = entry[name]
            print(
                f"{dtype:9s} {name:6s} weights+inputs {m['arguments_gib']:.3f} GiB, temporaries "
                f"{m['temporaries_gib']:.3f} GiB, output {m['output_gib']:.4f} GiB, peak {m['peak_gib']:.3f} GiB",
                flush=True,
            )
        if not args.skip_timing:
            params = jax.tree.map(
                lambda a: 0.02 * jax.random.normal(key, a.shape, a.dtype), spec(unet_params)
            )  # random weights: the speed does not depend on them
            rows_t = plan_rows(args.time_steps)
            inputs = (jnp.zeros((1, h, h, 4)), jnp.zeros((2, 77, 768)), rows_t, jnp.zeros((1, 2), jnp.uint32))
            run = lambda: loop(params, *inputs, jnp.float32(7.5), jnp.float32(0.0))  # noqa: E731
            jax.block_until_ready(run())  # compile for this step count, and warm up
            t0 = time.time()
            jax.block_until_ready(run())
            entry["seconds_per_step"] = (time.time() - t0) / args.time_steps
            print(f"{dtype:9s} loop   {entry['seconds_per_step']:.2f} s per denoising step (batch 1 x 2 for guidance)")
        results["programs"][dtype] = entry
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


def _text_cond(text):
    from research.cond import Cond

    return Cond(text=text)


if __name__ == "__main__":
    sys.exit(main())
