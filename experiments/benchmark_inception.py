"""CPU throughput of our FID Inception features against pytorch-fid's InceptionV3, on the same images.

Run from the repository root:
    PYTHONPATH=. python -m experiments.benchmark_inception                  # both cases, 5 reps, batch 50
    PYTHONPATH=. python -m experiments.benchmark_inception --quick          # 1 rep, batch 4 (smoke test)
    PYTHONPATH=. python -m experiments.benchmark_inception --variants ours,ours-unfused,torch --markdown b.md

Cases (uint8 images in, 2048-d features out, preprocessing included on both sides):
    mnist28   [B, 28, 28, 1] grayscale digits-like images: replicate to RGB, /255, bilinear resize to 299, 2x-1
    rgb299    [B, 299, 299, 3] images: /255 and 2x-1 only (both resizes are the identity)
Variants:
    ours          InceptionFeatures (preprocess + FIDInceptionV3 with fused 1x1 convs, compiled with
                  CPU_COMPILER_OPTIONS), one device
    ours-unfused  the same network computed op by op as pytorch-fid does (fuse=False)
    torch         pytorch-fid's InceptionV3([3], resize_input=True, normalize_input=True) under inference_mode
Both networks get the same converted weights (random weights with --random-weights; speed does not depend on
them). Each variant runs in its own worker process (torch's and XLA's thread pools in one process slow each
other down); the parent alternates which goes first in each repetition and reports medians. Our compile time is
excluded from the medians and printed separately. ratio = torch time / ours: > 1 means we are faster.

Columns: img/s from wall time (what a user waits for), and CPU ms/img: the worker's CPU time over all its threads
per image, which other load on the machine skews much less (torch's OpenMP pool loses most wall time to a busy
core).

XLA flags: the JAX workers get --xla-flags in XLA_FLAGS before jax is imported (default: none). InceptionFeatures
compiles its program with inception.CPU_COMPILER_OPTIONS (YNNPACK for dots and reductions only, the setting of
benchmark_unet's RECOMMENDED_XLA_FLAGS), which overrides XLA_FLAGS on that point: XLA's own convolutions took ~25%
less CPU time per image than YNNPACK's. The machine's load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

CASES = {"mnist28": (28, 1), "rgb299": (299, 3)}
VARIANTS = ("ours", "ours-unfused", "torch")


def make_images(case: str, batch: int) -> np.ndarray:
    """Deterministic uint8 images [B, H, W, C]: smooth blobs on black, like digits, so the resize sees edges."""
    size, channels = CASES[case]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.zeros((batch, size, size, channels), np.float64)
    for i in range(batch):
        for _ in range(3):
            cy, cx, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.05, 0.2)]
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            images[i] += blob[:, :, None] * rng.uniform(0.5, 1.0, channels)
    return np.clip(images * 255, 0, 255).astype(np.uint8)


def load_raw(random_weights: bool) -> dict:
    from research.metrics import inception

    if not random_weights:
        inception.load_inception_params()  # converts into the cache first when it can
        return inception.load_raw_weights(inception.default_weights_path())
    rng = np.random.default_rng(0)
    raw = {}
    for name, s in inception.conv_specs().items():
        raw[f"{name}/kernel"] = (
            rng.standard_normal((s.kh, s.kw, s.cin, s.cout)) * np.sqrt(2 / (s.kh * s.kw * s.cin))
        ).astype(np.float32)
        raw[f"{name}/beta"] = np.zeros(s.cout, np.float32)
        raw[f"{name}/mean"] = np.zeros(s.cout, np.float32)
        raw[f"{name}/var"] = np.ones(s.cout, np.float32)
    return raw


# --- workers: one process per variant, one JSON line per request -----------------------------------


def _serve(handlers: dict, ready: dict) -> None:
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        handlers[line.strip()]()
        print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}), flush=True)


def jax_worker(args) -> None:
    import jax

    from research.metrics import inception

    params = inception.fold_batch_norm(load_raw(args.random_weights))
    # The extractor users call: device transfer, padding, compiled preprocess + network, float64 features back.
    extractor = inception.InceptionFeatures(
        params,
        batch_size=args.batch,
        fuse=args.variant != "ours-unfused",
        devices=jax.devices()[:1],
        weights_tag="benchmark",
    )
    images = {case: make_images(case, args.batch) for case in CASES}
    handlers, compile_s = {}, {}
    for case, x in images.items():
        handlers[case] = lambda x=x: extractor(x, progress=False)
        t0 = time.perf_counter()
        handlers[case]()  # first call compiles
        compile_s[case] = time.perf_counter() - t0
    _serve(
        handlers, {"compile_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": len(jax.devices())}
    )


def torch_worker(args) -> None:
    # pytorch-fid imports torchvision, whose compiled operators do not load with the CPU torch here; the
    # test suite's shim skips the one module that needs them.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torch
    from reference import import_pytorch_fid

    from research.metrics import convert_inception

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    inception_module, _ = import_pytorch_fid()
    template = inception_module._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    arrays = convert_inception.pytorch_fid_from_raw(load_raw(args.random_weights))
    state_dict = {
        k: torch.from_numpy(np.array(arrays[k])) if k in arrays else torch.zeros_like(v) for k, v in template.items()
    }
    inception_module.load_state_dict_from_url = lambda *a, **k: state_dict
    net = inception_module.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    images = {case: make_images(case, args.batch) for case in CASES}

    @torch.inference_mode()
    def run(x):
        # What pytorch-fid's data loader and get_activations do: uint8 -> float [0, 1] NCHW, RGB.
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        return net(t)[0].squeeze(3).squeeze(2).numpy()

    handlers = {case: (lambda x=x: run(x)) for case, x in images.items()}
    for fn in handlers.values():
        fn()  # warm-up: allocator and oneDNN primitive caches
    _serve(handlers, {"threads": torch.get_num_threads()})


# --- parent ---------------------------------------------------------------------------------------


class Worker:
    def __init__(self, variant: str, args, env: dict):
        cmd = [
            sys.executable,
            "-m",
            "experiments.benchmark_inception",
            "--worker",
            variant,
            "--batch",
            str(args.batch),
            "--torch-threads",
            str(args.torch_threads),
        ]
        if args.random_weights:
            cmd.append("--random-weights")
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} died (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, case: str) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the worker process, all threads) for one batch."""
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["seconds"], reply["cpu_seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run(args) -> dict:
    env = dict(os.environ, XLA_FLAGS=args.xla_flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    if args.random_weights is False:
        load_raw(False)  # convert once here, not in each worker at the same time
    workers = {v: Worker(v, args, env) for v in args.variants}  # started one at a time
    times = {(v, c): [] for v in workers for c in args.cases}
    order = list(workers)
    for rep in range(args.reps):
        for case in args.cases:
            for v in order if rep % 2 == 0 else order[::-1]:
                times[(v, case)].append(workers[v].time(case))
        print(
            f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{v} {c} {t[-1][0]:.2f}s" for (v, c), t in times.items()),
            file=sys.stderr,
            flush=True,
        )
    for w in workers.values():
        w.close()
    return {
        "med": {k: statistics.median(t[0] for t in ts) for k, ts in times.items()},
        "cpu": {k: statistics.median(t[1] for t in ts) for k, ts in times.items()},
        "info": {v: w.info for v, w in workers.items()},
    }


def format_table(result: dict, args) -> str:
    med, cpu, info = result["med"], result["cpu"], result["info"]
    ours = [v for v in args.variants if v != "torch"]
    header = ["case", "batch"] + [f"{v} img/s" for v in args.variants]
    if "torch" in args.variants:
        header += [f"{v} / torch" for v in ours]
    header += [f"{v} CPU ms/img" for v in args.variants]
    if "torch" in args.variants:
        header += [f"{v} / torch (CPU)" for v in ours]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in args.cases:
        row = [case, str(args.batch)] + [f"{args.batch / med[(v, case)]:.2f}" for v in args.variants]
        if "torch" in args.variants:
            row += [f"{med[('torch', case)] / med[(v, case)]:.2f}" for v in ours]
        row += [f"{1000 * cpu[(v, case)] / args.batch:.0f}" for v in args.variants]
        if "torch" in args.variants:
            row += [f"{cpu[('torch', case)] / cpu[(v, case)]:.2f}" for v in ours]
        lines.append("| " + " | ".join(row) + " |")
    load = os.getloadavg()
    notes = [
        f"medians of {args.reps} alternating reps; ratio = torch time / ours (> 1: we are faster); CPU = "
        "process CPU time over all threads, less sensitive to other load than wall time; "
        f"{os.cpu_count()} CPUs, load avg {load[0]:.1f}/{load[1]:.1f}; XLA_FLAGS={args.xla_flags!r}"
    ]
    if "torch" in info:
        notes.append(f"torch threads {info['torch']['threads']}")
    for v in ours:
        notes.append(f"{v} compile s: " + ", ".join(f"{c} {s:.1f}" for c, s in info[v]["compile_s"].items()))
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--variants", default="ours,torch", help="comma-separated subset of: " + ",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=50, help="images per call (pytorch-fid's default is 50)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 rep and batch 4: a smoke test, not a measurement")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--xla-flags", default="", help="XLA_FLAGS of our workers (default: none)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights instead of the converted FID weights (same speed, no conversion needed)",
    )
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.variant = args.worker
        (torch_worker if args.worker == "torch" else jax_worker)(args)
        return
    if args.quick:
        args.reps, args.batch = 1, 4
    args.cases = args.cases.split(",")
    args.variants = args.variants.split(",")
    for name, chosen, known in (("case", args.cases, CASES), ("variant", args.variants, VARIANTS)):
        bad = [c for c in chosen if c not in known]
        if bad:
            p.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")
    table = format_table(run(args), args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
