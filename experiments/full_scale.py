"""The CIFAR-10 reproductions at full scale, ready for the first accelerator: the commands in order, the training
compute of each, its expected wall time, and the papers' numbers beside.

    python -m experiments.full_scale                              # the plan (table + commands); no device work
    python -m experiments.full_scale --script runs/cifar10.sh     # ... and the commands as a shell script
    python -m experiments.full_scale --measure 20                 # time 20 training steps of each network here

Compute: a training step costs (forward passes per example) x batch x the network's forward FLOPs, counted by
XLA's cost analysis as `research.summary` does (a multiply-add is 2 FLOPs). Passes per example: the trained network's
forward and backward (3), plus what the method adds: PD's two teacher DDIM steps (+2), CD's target network and the
teacher's Heun step (+1 +2), CT's target network (+1). Without --measure the wall time assumes --tflops sustained
(default 150 TFLOP/s: about 30% of an H100's or H200's 494 dense TF32 TFLOP/s, the precision float32 matmuls use on
those GPUs by default); it is an estimate, printed as one. --measure N trains each distinct network N steps on
synthetic data of CIFAR-10's shape on the present device (the first steps, which compile, are dropped), and replaces
the assumption by the measured step rate (for PD/CD/CT: that rate scaled by the ratio of passes). The data
(`$RESEARCH_DATA_DIR/cifar10/cifar-10-batches-py`) is needed only by the commands themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name, config (+ overrides), workdir, passes per example per step, what it needs first, the paper's numbers,
# and the evaluation commands (RUN stands for the workdir).
RUNS = [
    dict(
        name="DDPM",
        config="configs/ddpm_cifar10.py",
        overrides=[],
        workdir="runs/ddpm_cifar10",
        passes=3,
        needs=[],
        paper="FID 3.17, IS 9.46 (Ho et al. 2020, Table 1; 1000 ancestral steps, 50k samples)",
        evals=[
            "python -m research.sample --workdir RUN --sampler ddpm --steps 1000 --num 50000 --out RUN/fid50k",
            "python -m research.evaluate fid RUN/fid50k/samples_*.npz cifar10:train",
        ],
    ),
    dict(
        name="Improved DDPM (L_hybrid)",
        config="configs/iddpm_cifar10.py",
        overrides=[],
        workdir="runs/iddpm_cifar10",
        passes=3,
        needs=[],
        paper="NLL 2.94 bits/dim, FID 2.90 with 4000 steps (Nichol & Dhariwal 2021, Table 2 and Sec. 4)",
        evals=[
            "python -m research.evaluate bpd --workdir RUN --split test --num 10000 --clip-x0",  # the paper's protocol
            "python -m research.sample --workdir RUN --sampler ddpm --steps 4000 --num 50000 --out RUN/fid50k",
            "python -m research.evaluate fid RUN/fid50k/samples_*.npz cifar10:train",
        ],
    ),
    dict(
        name="v-prediction teacher (cosine)",
        config="configs/ddpm_cifar10.py",
        overrides=["--config.diffusion.prediction=v", "--config.diffusion.schedule=cosine"],
        workdir="runs/ddpm_cifar10_v",
        passes=3,
        needs=[],
        paper="(PD's teacher; the paper's is continuous-time, FID 2.1 at 8192 steps)",
        evals=[],
    ),
    dict(
        name="Progressive distillation",
        config="configs/pd_cifar10.py",
        overrides=[],
        workdir="runs/pd_cifar10",
        passes=5,
        needs=["runs/ddpm_cifar10_v"],
        paper="FID 9.12 / 4.51 / 3.00 / 2.57 at 1 / 2 / 4 / 8 steps (Salimans & Ho 2022, Fig. 4)",
        evals=[
            line
            for k in (1, 2, 4, 8)
            for line in (
                f"python -m research.sample --workdir RUN --steps {k} --num 50000 --out RUN/fid50k_{k}",
                f"python -m research.evaluate fid RUN/fid50k_{k}/samples_*.npz cifar10:train",
            )
        ],
    ),
    dict(
        name="Consistency distillation (l2)",
        config="configs/cd_cifar10.py",
        overrides=[],
        workdir="runs/cd_cifar10",
        passes=6,
        needs=["runs/ddpm_cifar10"],
        paper="FID 3.55 / 2.93 at 1 / 2 steps with LPIPS (Song et al. 2023, Table 1); l2 is worse (their Fig. 3)",
        evals=[
            line
            for k in (1, 2)
            for line in (
                f"python -m research.sample --workdir RUN --steps {k} --num 50000 --out RUN/fid50k_{k}",
                f"python -m research.evaluate fid RUN/fid50k_{k}/samples_*.npz cifar10:train",
            )
        ],
    ),
    dict(
        name="Improved consistency training",
        config="configs/ct_cifar10.py:ict",
        overrides=[],
        workdir="runs/ict_cifar10",
        passes=4,
        needs=[],
        paper="FID 2.83 / 2.46 at 1 / 2 steps with NCSN++ (Song & Dhariwal 2023, Table 2)",
        evals=[
            "python -m research.sample --workdir RUN --steps 1 --num 50000 --out RUN/fid50k",
            "python -m research.evaluate fid RUN/fid50k/samples_*.npz cifar10:train",
        ],
    ),
]


def _network_key(config) -> str:
    model = dict(config.model.to_dict())
    model.pop("dropout", None)
    return json.dumps(model, sort_keys=True, default=str) + str(config.data.image_size)


def plan(tflops: float, measured: dict | None = None) -> list:
    """One row per run: parameters, forward GFLOPs, steps x batch, training PFLOPs, hours (estimated or measured)."""
    from research.summary import summarize
    from research.tasks import get_config, task_of

    flops_of, rows = {}, []
    for run in RUNS:
        overrides = [tuple(o[len("--config.") :].split("=", 1)) for o in run["overrides"]]
        config = get_config(os.path.join(ROOT, run["config"]), overrides)
        net = task_of(config).network_config(config)
        key = _network_key(net)
        if key not in flops_of:
            flops_of[key] = summarize(net)
        summary = flops_of[key]
        steps, batch = int(config.train.num_steps), int(config.train.batch_size)
        train_flops = summary["gflops"] * 1e9 * run["passes"] * batch * steps
        row = dict(
            name=run["name"],
            params=summary["params"],
            gflops=summary["gflops"],
            steps=steps,
            batch=batch,
            passes=run["passes"],
            pflops=train_flops / 1e15,
            hours=train_flops / (tflops * 1e12) / 3600,
            source=f"estimate at {tflops:g} TFLOP/s",
        )
        if measured and key in measured:
            # the measured rate is for 3 passes at the measured batch; scale to this run's passes and batch
            m = measured[key]
            seconds_per_step = (1.0 / m["steps_per_sec"]) * (run["passes"] / 3) * (batch / m["batch"])
            row.update(hours=seconds_per_step * steps / 3600, source=f"measured on {m['device']}")
        row["key"] = key
        rows.append(row)
    return rows


def measure(num_steps: int) -> dict:
    """Steps/s of each distinct network's training step on the present device, synthetic CIFAR-shaped data."""
    import jax

    from research.tasks import get_config, task_of
    from research.train.loop import train

    done = {}
    for run in RUNS:
        config = get_config(os.path.join(ROOT, run["config"]))
        net = task_of(config).network_config(config)
        key = _network_key(net)
        if key in done or config.task != "diffusion":
            continue
        overrides = [
            ("data.name", "synthetic"),
            ("train.num_steps", str(num_steps)),
            ("train.log_every", "1"),
            ("train.ckpt_every", str(num_steps)),
            ("train.sample_every", "0"),
            ("train.tensorboard", "false"),
        ]
        config = get_config(os.path.join(ROOT, run["config"]), overrides)
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.time()
            train(config, workdir)
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rates = [r["steps_per_sec"] for r in map(json.loads, f) if "steps_per_sec" in r]
        rates = sorted(rates[2:] or rates)  # the first steps include compilation
        rate = rates[len(rates) // 2]
        device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        done[key] = {"steps_per_sec": rate, "batch": int(config.train.batch_size), "device": device}
        print(
            f"{run['config']}: {rate:.3f} steps/s at batch {config.train.batch_size} on {device} "
            f"({time.time() - t0:.0f} s with compilation)",
            flush=True,
        )
    return done


def commands() -> list:
    lines = []
    for run in RUNS:
        if run["needs"]:
            lines.append(f"# needs {', '.join(run['needs'])}")
        lines.append(
            " ".join(
                ["python -m research.train --config", run["config"], *run["overrides"], "--workdir", run["workdir"]]
            )
        )
        lines += [e.replace("RUN", run["workdir"]) for e in run["evals"]]
    return lines


def render(rows: list) -> str:
    out = [
        "| run | params | fwd GFLOPs | steps x batch | passes | training PFLOPs | wall time | paper |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row, run in zip(rows, RUNS):
        out.append(
            f"| {row['name']} (`{run['config']}`) | {row['params'] / 1e6:.1f}M | {row['gflops']:.2f} | "
            f"{row['steps']:,} x {row['batch']} | {row['passes']} | {row['pflops']:,.0f} | "
            f"{row['hours']:.1f} h ({row['source']}) | {run['paper']} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tflops", type=float, default=150.0, help="assumed sustained TFLOP/s (without --measure)")
    p.add_argument("--measure", type=int, default=0, help="time N training steps of each network on this device")
    p.add_argument("--script", default="", help="also write the commands as a shell script")
    args = p.parse_args(argv)
    if args.tflops <= 0:
        print("error: --tflops must be positive", file=sys.stderr)
        return 2
    if args.measure and args.measure < 5:
        print("error: --measure needs at least 5 steps (the first ones compile)", file=sys.stderr)
        return 2
    measured = measure(args.measure) if args.measure else None
    print(render(plan(args.tflops, measured)))
    print("\nCommands, in order:\n")
    lines = commands()
    print("\n".join(lines))
    if args.script:
        with open(args.script, "w") as f:
            f.write("#!/usr/bin/env bash\n# written by python -m experiments.full_scale\nset -euo pipefail\n")
            f.write("\n".join(lines) + "\n")
        os.chmod(args.script, 0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main())
