"""CPU speed of our Flax U-Net against the equivalent diffusers (PyTorch) UNet2DModel.

Run:
    PYTHONPATH=. python experiments/benchmark_unet.py                 # both models, 5 reps
    PYTHONPATH=. python experiments/benchmark_unet.py --quick         # 1 rep, small batches (smoke test)
    PYTHONPATH=. python experiments/benchmark_unet.py --models cifar --reps 7 --markdown bench.md

Models: 'small' = the MNIST U-Net of configs/ddpm_mnist.py (28x28x1, 6.47M params); 'cifar' = the DDPM
CIFAR-10 U-Net (32x32x3, 35.7M params). Each framework runs in its own worker process (torch and XLA
thread pools in one process slow each other down badly); the parent drives both over pipes and
alternates which goes first in each repetition, so machine noise hits both alike. Medians are reported.

Columns:
    step/s         steady optimiser steps per second (loss, backward, Adam; dropout on), batch --train-batch:
                   each framework runs --steps consecutive steps per rep; steps 2..n are the steady ones
    first-step     the ratio for the first of those steps, which follows the other framework's turn; ours is
                   1-2 s slower there (idle time alone does not cause it; the cause is not known)
    ddim50 s       seconds for one full 50-step DDIM sampling run of --sample-batch images
    ratio          torch time / our time: > 1 means we are faster
Compile time of our jitted train step and sampler is excluded from the medians and printed separately.

XLA flags: the JAX worker gets --xla-flags (default RECOMMENDED_XLA_FLAGS below) in XLA_FLAGS before it
imports jax; pass --xla-flags '' to measure XLA's defaults. Other load on the machine skews the
comparison (torch's OpenMP pool suffers much more from a busy core than XLA's), so the load average is
printed with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

# XLA's default CPU pipeline hands convolutions to YNNPACK, whose weight-gradient convolutions run
# 2-3x slower than XLA's own (Eigen) ones on this CPU; keeping YNNPACK for dots and reductions only
# sped up the train step ~15-25%. Must be in XLA_FLAGS before jax initialises its CPU backend.
RECOMMENDED_XLA_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
)

MODELS = {
    # name: (image size, channels, our UNet kwargs, diffusers UNet2DModel kwargs)
    "small": (
        28,
        1,
        dict(out_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1),
        dict(
            block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        ),
    ),
    "cifar": (
        32,
        3,
        dict(out_channels=3),
        dict(
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        ),
    ),
}
DEFAULT_BATCH = {"small": (64, 64), "cifar": (16, 16)}  # (train, sample)
QUICK_BATCH = (4, 4)


# --- workers: one process per framework, one JSON line per request ---------------------------------


def _serve(handlers: dict, ready: dict) -> None:
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        handlers[line.strip()]()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from research.diffusion.samplers import ddim_sample
    from research.diffusion.schedules import make_schedule, respace, space_timesteps
    from research.models.unet import UNet

    size, channels, ours, _ = MODELS[args.model]
    model = UNet(**ours)
    tb, sb = args.train_batch, args.sample_batch
    x = jax.random.normal(jax.random.PRNGKey(0), (tb, size, size, channels))
    t = jnp.arange(tb) * (999 // max(tb - 1, 1))
    params = model.init(jax.random.PRNGKey(1), x, t)["params"]
    opt = optax.adam(2e-4)
    state = {"params": params, "opt": opt.init(params), "key": jax.random.PRNGKey(2)}

    def loss_fn(p, x, t, key):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
        return jnp.mean(jnp.square(out - x))

    # Donating params and optimiser state lets XLA update them in place, as torch does.
    def train_step(p, o, key, x, t):
        key, sub = jax.random.split(key)
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, sub)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, key, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))

    schedule = respace(make_schedule("linear", 1000), space_timesteps(1000, "ddim50"))
    shape = (sb, size, size, channels)
    sampler = jax.jit(
        lambda p, key: ddim_sample(lambda xt, tt, c: model.apply({"params": p}, xt, tt), schedule, key, shape).samples
    )

    def train():
        p, o, k, loss = train_step(state["params"], state["opt"], state["key"], x, t)
        jax.block_until_ready(loss)
        state.update(params=p, opt=o, key=k)

    def sample():
        jax.block_until_ready(sampler(state["params"], jax.random.PRNGKey(3)))

    compile_s = {}
    for name, fn in (("train", train), ("sample", sample)):
        t0 = time.perf_counter()
        fn()  # first call compiles
        compile_s[name] = time.perf_counter() - t0
    n = sum(v.size for v in jax.tree_util.tree_leaves(state["params"]))
    _serve(
        {"train": train, "sample": sample},
        {"params": int(n), "compile_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", "")},
    )


def torch_worker(args) -> None:
    import types

    import torch

    # diffusers imports transformers, which imports torchvision; the torchvision wheel the test extra installs is a
    # CUDA build whose meta-kernel registrations fail to load next to the CPU torch (see tests/reference.py). The
    # U-Net needs none of torchvision's operators, so that one module is replaced by an empty stand-in.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from diffusers import DDIMScheduler, UNet2DModel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    size, channels, _, theirs = MODELS[args.model]
    model = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
        attention_head_dim=None,
        dropout=0.1,
        downsample_padding=0,
        **theirs,
    )
    tb, sb = args.train_batch, args.sample_batch
    torch.manual_seed(0)
    x = torch.randn(tb, channels, size, size)
    t = torch.arange(tb) * (999 // max(tb - 1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.mean(torch.square(model(x, t).sample - x))
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def sample():
        model.eval()
        scheduler.set_timesteps(50)
        xt = torch.randn(sb, channels, size, size)
        for step in scheduler.timesteps:
            eps = model(xt, step).sample
            xt = scheduler.step(eps, step, xt, eta=0.0).prev_sample

    for fn in (train, sample):
        fn()  # warm-up: allocator and oneDNN primitive caches
    _serve(
        {"train": train, "sample": sample},
        {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()},
    )


# --- parent ---------------------------------------------------------------------------------------


class Worker:
    def __init__(self, framework: str, args, model: str, env: dict):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            framework,
            "--model",
            model,
            "--train-batch",
            str(args.train_batch),
            "--sample-batch",
            str(args.sample_batch),
            "--torch-threads",
            str(args.torch_threads),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, what: str) -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def bench_model(name: str, args) -> dict:
    env = dict(os.environ, XLA_FLAGS=args.xla_flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    # Start one at a time so our compile time is not inflated by torch's start-up.
    workers = {"ours": Worker("jax", args, name, env), "torch": Worker("torch", args, name, env)}
    if workers["ours"].info["params"] != workers["torch"].info["params"]:
        print(
            f"warning: parameter counts differ: {workers['ours'].info['params']} vs {workers['torch'].info['params']}",
            file=sys.stderr,
        )
    times = {(w, what): [] for w in workers for what in ("train", "first", "sample")}
    order = list(workers)
    for rep in range(args.reps):
        for w in order if rep % 2 == 0 else order[::-1]:
            # Consecutive steps: the first one after the other framework ran is reported apart ("first");
            # the following ones are steady training ("train").
            times[(w, "first")].append(workers[w].time("train"))
            times[(w, "train")].extend(workers[w].time("train") for _ in range(args.steps - 1))
        if not args.no_sample:
            for w in order if rep % 2 == 0 else order[::-1]:
                times[(w, "sample")].append(workers[w].time("sample"))
        print(
            f"  {name} rep {rep + 1}/{args.reps}: "
            + ", ".join(f"{w} {what} {v[-1]:.2f}s" for (w, what), v in times.items() if v),
            file=sys.stderr,
            flush=True,
        )
    for w in workers.values():
        w.close()
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    return {
        "model": name,
        "params": workers["ours"].info["params"],
        "med": med,
        "compile": workers["ours"].info["compile_s"],
        "torch_threads": workers["torch"].info["threads"],
    }


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"  # NaN: not measured (--no-sample)


def format_table(results, args) -> str:
    lines = [
        "| model | params | train batch | ours step/s | torch step/s | train ratio | first-step ratio | sample batch "
        "| ours ddim50 s | torch ddim50 s | ddim ratio | our compile s (train / sample) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["med"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {args.train_batch_of(r['model'])} "
            f"| {1 / m[('ours', 'train')]:.3f} | {1 / m[('torch', 'train')]:.3f} "
            f"| {m[('torch', 'train')] / m[('ours', 'train')]:.2f} "
            f"| {m[('torch', 'first')] / m[('ours', 'first')]:.2f} "
            f"| {args.sample_batch_of(r['model'])} "
            f"| {_fmt(m[('ours', 'sample')])} | {_fmt(m[('torch', 'sample')])} "
            f"| {_fmt(m[('torch', 'sample')] / m[('ours', 'sample')])} "
            f"| {r['compile']['train']:.0f} / {r['compile']['sample']:.0f} |"
        )
    load = os.getloadavg()
    lines.append("")
    lines.append(
        f"medians of {args.reps} alternating reps of {args.steps} consecutive train steps "
        f"(train: steps 2-{args.steps}; first-step: step 1, right after the other framework ran) and one sampling run; "
        f"ratio = torch time / ours (>1: we are faster); "
        f"{os.cpu_count()} CPUs, torch threads {results[0]['torch_threads'] if results else '?'}, "
        f"load avg {load[0]:.1f}/{load[1]:.1f}; XLA_FLAGS={args.xla_flags!r}"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="small,cifar", help="comma-separated subset of: " + ",".join(MODELS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="consecutive train steps per framework and rep (>= 2)")
    p.add_argument("--no-sample", action="store_true", help="time the train step only")
    p.add_argument("--quick", action="store_true", help="1 rep and batch 4: a smoke test, not a measurement")
    p.add_argument("--train-batch", type=int, default=None, help="default: 64 small, 16 cifar")
    p.add_argument("--sample-batch", type=int, default=None, help="default: 64 small, 16 cifar")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--xla-flags", default=RECOMMENDED_XLA_FLAGS)
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args)
        return

    if args.quick:
        args.reps = 1
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step after a switch is reported apart from the steady ones")
    user_tb, user_sb = args.train_batch, args.sample_batch
    args.train_batch_of = lambda m: user_tb or (QUICK_BATCH[0] if args.quick else DEFAULT_BATCH[m][0])
    args.sample_batch_of = lambda m: user_sb or (QUICK_BATCH[1] if args.quick else DEFAULT_BATCH[m][1])
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        args.train_batch, args.sample_batch = args.train_batch_of(name), args.sample_batch_of(name)
        results.append(bench_model(name, args))
    table = format_table(results, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
