"""Sweep runner: train one run per cell of a grid of config values (x seeds), evaluate each, tabulate mean +- std.

    python -m experiments.sweep --config FILE[:VARIANT] --grid KEY=V1,V2 [--grid KEY=...] [--set KEY=VALUE ...]
        [--seeds 0,1,2] [--eval fid_domain,bpd,loss] [--curve] --out DIR [--dry-run]

    # the Improved DDPM ablation: schedule x objective, bits/dim at respaced step counts, 3 seeds
    python -m experiments.sweep --config configs/iddpm_mnist.py \\
        --grid variant=linear-simple,linear-hybrid,cosine-simple,cosine-hybrid \\
        --grid eval.steps=25,50,100 --seeds 0,1,2 --eval bpd --out runs/sweep_iddpm

    # DDIM's eta at few steps on the digits quickstart model
    python -m experiments.sweep --config configs/quickstart.py --grid eval.steps=10,20,50 --grid eval.eta=0,1 \\
        --set eval.sampler=ddim --seeds 0,1,2 --eval fid_domain --out runs/sweep_eta

Keys:
  - a config key (`diffusion.schedule`, `optim.lr`, ...): a training cell per value, typed like `--config.KEY=`;
  - `variant`: the config file's variant (`FILE:VARIANT`);
  - `eval.KEY`: an evaluation option, so the values share one trained model per training cell:
    `eval.sampler`, `eval.steps`, `eval.eta`, `eval.guidance`, `eval.sigmas` (as `research.sample`; several
    level lists are split on ';': `--grid 'eval.sigmas=80,0.7;80,1.5'`), `eval.num` (samples for FID, default
    1000), `eval.bpd_num` (test images for bits/dim, default 200), `eval.bpd_clip` (true: bits/dim with each
    predicted x0 clipped to [-1, 1], `research.evaluate bpd --clip-x0`), `eval.batch` (500).
  Values are split on ',' or, when the text has a ';', on ';' (`--grid 'model.ch_mult=1,2;1,2,2'`).

Evaluations (--eval): `fid_domain` (domain-classifier FID of eval.num samples against the training split, plus
the classifier score and, for class-conditional runs, the classifier's accuracy on the requested classes), `bpd`
(the variational bound on eval.bpd_num test images, respaced to eval.steps when given), `loss` (the mean training
loss over the last 10% of logged steps), `log.KEY` (the same for any scalar the trainer logs, e.g.
`log.d_accuracy`, ADD's discriminator accuracy).

Layout of DIR: sweep.json (the base config and training overrides: a rerun with another --config or with other
non-eval --set values is refused; the grid, seeds and eval.* options may change), runs/CELL/ (one training
workdir per training cell and seed; CELL is `key=value+...+seed=S`), runs/CELL/sweep/*.json (each evaluation,
keyed by its options and checkpoint step). Each invocation writes NAME.md and NAME.csv (NAME from --table,
default `table`: one row per grid cell, each metric's mean, sample std over seeds and count; the .md holds the
command that rebuilds it), NAME_timings.csv (wall seconds per training and evaluation) and NAME_METRIC.png (the
metric against the last grid key, a line per combination of the others, error bars one std). --curve also
evaluates every checkpoint the runs kept (`train.ckpt_every` and `train.keep_checkpoints` set them): NAME_curves.csv
and NAME_curve_METRIC.png, the evidence that a run has converged (the metric flat, not only the loss).
Everything is resumable: a finished training or evaluation is read back, an interrupted training resumes from its
newest checkpoint (the trainer's exact resume), so a killed sweep rerun with the same command ends with the same
table. --dry-run lists the cells and exits.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from research.cli import number_list

EVAL_DEFAULTS = {
    "sampler": None,
    "steps": None,
    "eta": None,
    "guidance": None,
    "num": 1000,
    "bpd_num": 200,
    "batch": 500,
    "sigmas": None,
    "bpd_clip": None,
}


_noise_levels = number_list(float, "noise levels")


def _levels(text: str) -> str:
    """eval.sigmas: comma-separated noise levels, kept as text (the cell's name and cache key hold it as written)."""
    _noise_levels(text)
    return text


def _flag(text: str):
    """eval.bpd_clip: true or false; false is kept as None, the unset default, so it shares its cache."""
    word = text.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return None
    raise ValueError(text)


EVAL_TYPES = {
    "sampler": str,
    "steps": str,
    "eta": float,
    "guidance": float,
    "num": int,
    "bpd_num": int,
    "batch": int,
    "sigmas": _levels,
    "bpd_clip": _flag,
}
# Options added after sweeps had cached evaluations: they enter the cache key only when set, so the caches of older
# sweeps stay valid.
KEYED_WHEN_SET = ("sigmas", "bpd_clip")
EVAL_MINIMUM = {"num": 2, "bpd_num": 1, "batch": 1}  # FID needs two samples; refused before anything trains


class SweepError(ValueError):
    """A sweep the runner cannot do, named before anything is trained."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run (config overrides + seed) and one set of evaluation options."""

    grid: Tuple[Tuple[str, str], ...]  # the grid's (key, value) pairs, in --grid order (eval keys included)
    seed: int
    variant: Optional[str]
    overrides: Tuple[Tuple[str, str], ...]  # config overrides of this training run (--set, then grid)
    eval_options: Tuple[Tuple[str, object], ...]

    @property
    def train_name(self) -> str:
        parts = [f"variant={self.variant}"] if self.variant is not None else []
        parts += [f"{k}={v}" for k, v in self.grid if not k.startswith("eval.") and k != "variant"]
        parts.append(f"seed={self.seed}")
        return _safe("+".join(parts))

    @property
    def label(self) -> Tuple[str, ...]:
        return tuple(v for _, v in self.grid)


def _safe(name: str) -> str:
    name = "".join(c if c.isalnum() or c in "=+.,-_" else "_" for c in name)
    if len(name) > 150:  # keep directory names short; the hash keeps them distinct
        name = name[:120] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def split_values(text: str) -> List[str]:
    values = [v.strip() for v in text.split(";" if ";" in text else ",")]
    if not values or any(v == "" for v in values):
        raise SweepError(f"empty value in {text!r}")
    return values


def parse_assignment(text: str, flag: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SweepError(f"{flag} {text!r}: write KEY=VALUE")
    return key.strip(), value.strip()


def _eval_value(key: str, text: str):
    name = key[len("eval.") :]
    if name not in EVAL_TYPES:
        raise SweepError(f"unknown evaluation option {key!r}: use one of {['eval.' + k for k in EVAL_TYPES]}")
    try:
        value = EVAL_TYPES[name](text)
    except (ValueError, argparse.ArgumentTypeError):
        wanted = {"sigmas": "comma-separated numbers", "bpd_clip": "true or false"}.get(name, EVAL_TYPES[name].__name__)
        raise SweepError(f"{key}={text!r}: expected {wanted}") from None
    least = EVAL_MINIMUM.get(name)
    if least is not None and value < least:
        raise SweepError(f"{key}={text!r}: must be at least {least}")
    return value


def plan_cells(config_arg: str, grids: Sequence[str], sets: Sequence[str], seeds: Sequence[int]) -> List[Cell]:
    """Every cell of the sweep, each training config checked (unknown keys, bad values) before anything runs."""
    from research.tasks import get_config

    path, _, file_variant = config_arg.partition(":")
    grid_axes = []
    for text in grids:
        key, values = parse_assignment(text, "--grid")
        if key in [k for k, _ in grid_axes]:
            raise SweepError(f"--grid {key} given twice")
        if key == "seed":
            raise SweepError("seeds are a sweep axis of their own: use --seeds 0,1,2")
        if key == "variant" and file_variant:
            raise SweepError(f"--config {config_arg} names a variant and --grid sweeps variants: use one")
        values = split_values(values)
        if key.startswith("eval."):
            for v in values:
                _eval_value(key, v)
        grid_axes.append((key, values))
    base_overrides, base_eval = [], dict(EVAL_DEFAULTS)
    for text in sets:
        key, value = parse_assignment(text, "--set")
        if key.startswith("eval."):
            base_eval[key[5:]] = _eval_value(key, value)
        else:
            base_overrides.append((key, value))
    if not seeds:
        raise SweepError("--seeds is empty")
    cells, checked = [], {}
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid_axes]):
        variant = file_variant or None
        overrides, options = list(base_overrides), dict(base_eval)
        for k, v in combo:
            if k == "variant":
                variant = v
            elif k.startswith("eval."):
                options[k[5:]] = _eval_value(k, v)
            else:
                overrides.append((k, v))
        for seed in seeds:
            cell = Cell(tuple(combo), int(seed), variant, tuple(overrides), tuple(sorted(options.items())))
            if cell.train_name not in checked:
                checked[cell.train_name] = True
                try:
                    get_config(_config_path(path, variant), cell_overrides(cell))
                except Exception as e:  # ConfigError, a missing file, a bad variant: name the cell
                    raise SweepError(f"cell {cell.train_name}: {e}") from None
            cells.append(cell)
    return cells


def _config_path(path: str, variant: Optional[str]) -> str:
    return f"{path}:{variant}" if variant else path


def cell_overrides(cell: Cell) -> List[Tuple[str, str]]:
    return list(cell.overrides) + [("seed", str(cell.seed))]


# ---------------------------------------------------------------------------------------------------- evaluations


def _write_json(path: str, value) -> None:
    """Atomic: a sweep killed while writing leaves the old file or none, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _cached(path: str, compute: Callable[[], dict]) -> dict:
    """The JSON at `path`, or compute() plus its wall seconds, written atomically: what makes a sweep resumable."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t0 = time.time()
    value = compute()
    value["seconds"] = round(time.time() - t0, 1)
    _write_json(path, value)
    return value


def _sample_options(options: dict):
    from research.tasks import SampleOptions

    sigmas = options.get("sigmas")
    return SampleOptions(
        sampler=options["sampler"],
        steps=options["steps"],
        eta=options["eta"],
        guidance=options["guidance"],
        batch_size=options["batch"],
        sigmas=None if sigmas is None else _noise_levels(sigmas),
    )


def eval_fid_domain(workdir: str, options: dict, seed: int, step: int) -> dict:
    from research.run import read_config
    from research.train.loop import checkpoint_domain_scores

    return checkpoint_domain_scores(
        workdir, read_config(workdir), step, int(options["num"]), seed=seed, options=_sample_options(options)
    )


def eval_bpd(workdir: str, options: dict, seed: int, step: int) -> dict:
    from research.data import make_eval_arrays
    from research.evaluate import check_bpd_request, evaluate_bpd
    from research.loader import load_run
    from research.run import read_config

    config = read_config(workdir)
    clip = bool(options.get("bpd_clip"))
    check_bpd_request(config, workdir, steps=options["steps"], num=int(options["bpd_num"]), clip_x0=clip)
    config, model, params, _ = load_run(workdir, step)
    images, labels = make_eval_arrays(config.data, "test", num=int(options["bpd_num"]))
    result = evaluate_bpd(
        model,
        params,
        config,
        images,
        steps=options["steps"],
        batch_size=100,
        seed=seed,
        labels=labels,
        progress=False,
        clip_x0=clip,
    )
    return {"bpd": result["bpd"]}


def eval_logged(workdir: str, key: str, step: int) -> float:
    """The mean of a scalar the trainer logged to metrics.jsonl (`loss`, `d_accuracy`, ...) over the last 10% of
    its logged steps up to `step`."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if key in row and "step" in row:
                by_step[int(row["step"])] = float(row[key])  # a resumed run logs steps again: keep the last
    if not by_step:
        raise SweepError(f"{workdir}/metrics.jsonl has no logged {key!r}")
    steps = [s for s in sorted(by_step) if s <= step]
    if not steps:
        raise SweepError(f"{workdir}/metrics.jsonl has no logged {key!r} up to step {step}")
    tail = steps[-max(1, len(steps) // 10) :]
    return sum(by_step[s] for s in tail) / len(tail)


def eval_loss(workdir: str, options: dict, seed: int, step: int) -> dict:
    return {"loss": eval_logged(workdir, "loss", step)}


# name -> (function, the options its result depends on)
EVALUATORS: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {
    "fid_domain": (eval_fid_domain, ("sampler", "steps", "eta", "guidance", "num", "sigmas")),
    "bpd": (eval_bpd, ("steps", "bpd_num", "bpd_clip")),
    "loss": (eval_loss, ()),
}
LOGGED_PREFIX = "log."  # --eval log.KEY: any scalar of metrics.jsonl, as `loss`


def evaluator(name: str) -> Optional[Tuple[Callable, Tuple[str, ...]]]:
    """(function, the options its result depends on) of an --eval name; None when unknown."""
    if name.startswith(LOGGED_PREFIX) and len(name) > len(LOGGED_PREFIX):
        key = name[len(LOGGED_PREFIX) :]
        return (lambda workdir, options, seed, step: {key: eval_logged(workdir, key, step)}), ()
    return EVALUATORS.get(name)


def _eval_key(name: str, options: dict, step: int, seed: int) -> str:
    used = {k: options.get(k) for k in evaluator(name)[1]}
    used = {k: v for k, v in used.items() if k not in KEYED_WHEN_SET or v is not None}
    text = json.dumps(used, sort_keys=True)
    readable = "_".join(f"{k}{v}" for k, v in used.items() if v is not None)
    return _safe(f"{name}_step{step}_seed{seed}_{readable}_{hashlib.sha256(text.encode()).hexdigest()[:8]}")


# ----------------------------------------------------------------------------------------------------- the sweep


def _training_sets(sets: Sequence[str]) -> List[str]:
    return [t for t in sets if not t.strip().startswith("eval.")]


def _check_spec(out: str, spec: dict, name: str) -> None:
    """OUT belongs to one base config and one set of training overrides; its tables may be many (--table)."""
    path = os.path.join(out, "sweep.json")
    record = {"config": spec["config"], "train_set": _training_sets(spec["set"]), "tables": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old_sets = old.get("train_set", _training_sets(old.get("set", [])))
        if (old.get("config"), old_sets) != (record["config"], record["train_set"]):
            raise SweepError(
                f"{out} holds a sweep of --config {old.get('config')} --set {old_sets}; this one is "
                f"--config {spec['config']} --set {record['train_set']} (evaluation options aside). Use another "
                "--out (grids, seeds and eval.* options may change in place)."
            )
        record["tables"] = old.get("tables", {})
    record["tables"][name] = spec
    os.makedirs(out, exist_ok=True)
    _write_json(path, record)


def run_sweep(
    config_arg: str,
    grids: Sequence[str],
    sets: Sequence[str],
    seeds: Sequence[int],
    evals: Sequence[str],
    out: str,
    *,
    curve: bool = False,
    name: str = "table",
    announce: Callable[[str], None] = print,
) -> List[dict]:
    """Train and evaluate every cell (reading back what is done) -> one result row per cell; writes the tables.
    curve: also evaluate every kept checkpoint of every run (learning curves, OUT/NAME_curves.csv and plots).
    name: the stem of this invocation's outputs (NAME.md, NAME.csv, ...), so several tables can share OUT's runs."""
    from research.run import checkpoint_steps
    from research.train.loop import train

    unknown = [e for e in evals if evaluator(e) is None]
    if unknown or not evals:
        raise SweepError(f"--eval {','.join(evals)}: choose from {list(EVALUATORS)} or log.KEY")
    cells = plan_cells(config_arg, grids, sets, seeds)
    path = config_arg.partition(":")[0]
    spec = {"config": config_arg, "grid": list(grids), "set": list(sets), "seeds": list(seeds), "eval": list(evals)}
    spec["curve"] = curve
    if not name or _safe(name) != name or "=" in name:
        raise SweepError(f"--table {name!r}: use letters, digits, '-' and '_'")
    _check_spec(out, spec, name)
    timings, rows, curve_rows = [], [], []
    trained = {}

    def _evaluate(workdir, cell, evals, step, where):
        options, metrics = dict(cell.eval_options), {}
        os.makedirs(os.path.join(workdir, "sweep"), exist_ok=True)
        for name in evals:

            def compute(name=name):
                announce(f"{where} {name} of {cell.train_name} {_options_text(cell)}")
                return {"metrics": evaluator(name)[0](workdir, options, cell.seed, step)}

            cache = os.path.join(workdir, "sweep", _eval_key(name, options, step, cell.seed) + ".json")
            value = _cached(cache, compute)
            metrics.update(value["metrics"])
            what = cell.train_name + " " + _options_text(cell) + f" step {step}"
            timings.append({"what": name, "cell": what, "seconds": value["seconds"]})
        return metrics

    for i, cell in enumerate(cells):
        workdir = os.path.join(out, "runs", cell.train_name)
        done = os.path.join(workdir, "sweep_trained.json")
        if cell.train_name not in trained:

            def run_training(cell=cell, workdir=workdir, i=i):
                from research.tasks import get_config

                announce(f"[{i + 1}/{len(cells)}] training {cell.train_name}")
                train(get_config(_config_path(path, cell.variant), cell_overrides(cell)), workdir)
                return {"step": max(checkpoint_steps(workdir))}

            info = _cached(done, run_training)
            trained[cell.train_name] = info
            timings.append({"what": "train", "cell": cell.train_name, "seconds": info["seconds"]})
        step = trained[cell.train_name]["step"]
        rows.append({"cell": cell, "metrics": _evaluate(workdir, cell, evals, step, f"[{i + 1}/{len(cells)}]")})
        if curve:
            for ckpt in checkpoint_steps(workdir):
                metrics = _evaluate(workdir, cell, evals, ckpt, f"[{i + 1}/{len(cells)}] curve, step {ckpt}:")
                curve_rows.append({"cell": cell, "step": int(ckpt), "metrics": metrics})
    write_tables(rows, [k for k, _ in _axes(grids)], out, spec, name)
    if curve:
        write_curves(curve_rows, [k for k, _ in _axes(grids)], out, name)
    with open(os.path.join(out, f"{name}_timings.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["what", "cell", "seconds"])
        w.writeheader()
        w.writerows(timings)
    return rows


def _axes(grids):
    return [parse_assignment(g, "--grid") for g in grids]


def _options_text(cell: Cell) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.grid if k.startswith("eval.")) or ""


def summarize(rows: List[dict]) -> Tuple[List[Tuple[str, ...]], List[str], Dict[Tuple[str, ...], Dict[str, list]]]:
    """Group rows by grid cell (over seeds) -> (labels in order, metric names, label -> metric -> values)."""
    labels, metrics, groups = [], [], {}
    for row in rows:
        label = row["cell"].label
        if label not in groups:
            labels.append(label)
            groups[label] = {}
        for k, v in row["metrics"].items():
            if k not in metrics:
                metrics.append(k)
            groups[label].setdefault(k, []).append(float(v))
    return labels, metrics, groups


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and the sample standard deviation (n - 1; 0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_mean_std(mean: float, std: float, count: int = 2) -> str:
    """Format "mean ± std": the std to two significant figures and the mean to the same decimal place ("1.0 ± 1.0",
    "11.90 ± 0.98", "1978 ± 96"); a std of 0 (or a non-finite one) leaves the mean at 4 figures, and a single value
    (`count` 1, where there is no spread to report) is the mean alone."""
    if count < 2:
        return f"{mean:.4g}"
    if not math.isfinite(std) or std <= 0 or not math.isfinite(mean):
        return f"{mean:.4g} ± {std:.2g}"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def write_tables(rows: List[dict], keys: List[str], out: str, spec: dict, name: str = "table") -> str:
    labels, metrics, groups = summarize(rows)
    header = keys + [f"{m} {s}" for m in metrics for s in ("mean", "std")] + ["seeds"]
    csv_rows, md = [], []
    for label in labels:
        stats = {m: mean_std(groups[label][m]) for m in metrics if m in groups[label]}
        n = max(len(v) for v in groups[label].values())
        csv_rows.append(
            list(label) + [f"{stats[m][i]:.6g}" if m in stats else "" for m in metrics for i in (0, 1)] + [str(n)]
        )
        cells = [format_mean_std(*stats[m], len(groups[label][m])) if m in stats else "-" for m in metrics]
        md.append("| " + " | ".join(list(label) + cells + [str(n)]) + " |")
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(csv_rows)
    command = "python -m experiments.sweep --config " + spec["config"]
    command += "".join(f" --grid '{g}'" for g in spec["grid"]) + "".join(f" --set '{s}'" for s in spec["set"])
    command += f" --seeds {','.join(map(str, spec['seeds']))} --eval {','.join(spec['eval'])}"
    command += (
        (" --curve" if spec.get("curve") else "") + (f" --table {name}" if name != "table" else "") + f" --out {out}"
    )
    text = "\n".join(
        [
            f"# Sweep of {spec['config']}",
            "",
            f"`{command}`",
            "",
            "Mean ± sample std over seeds.",
            "",
            "| " + " | ".join(keys + metrics + ["seeds"]) + " |",
            "|" + "---|" * len(keys) + "---:|" * (len(metrics) + 1),
            *md,
        ]
    )
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    _plots(labels, metrics, groups, keys, out, name)
    return text


def write_curves(curve_rows: List[dict], keys: List[str], out: str, name: str = "table") -> None:
    """OUT/NAME_curves.csv (mean and std over seeds per grid cell and checkpoint step), NAME_curve_METRIC.png."""
    by_step: Dict[Tuple[Tuple[str, ...], int], Dict[str, list]] = {}
    metrics: List[str] = []
    for row in curve_rows:
        group = by_step.setdefault((row["cell"].label, row["step"]), {})
        for k, v in row["metrics"].items():
            metrics += [k] if k not in metrics else []
            group.setdefault(k, []).append(float(v))
    with open(os.path.join(out, f"{name}_curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + ["step"] + [f"{m} {s}" for m in metrics for s in ("mean", "std")] + ["seeds"])
        for (label, step), group in by_step.items():
            stats = [mean_std(group[m]) if m in group else None for m in metrics]
            values = [f"{st[i]:.6g}" if st else "" for st in stats for i in (0, 1)]
            w.writerow(list(label) + [step] + values + [max(len(v) for v in group.values())])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in by_step))
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label in labels:
            pts = sorted((step, *mean_std(g[m])) for (lab, step), g in by_step.items() if lab == label and m in g)
            legend = ", ".join(f"{k}={v}" for k, v in zip(keys, label)) or m
            ax.errorbar(
                *zip(*[(p[0], p[1]) for p in pts]), yerr=[p[2] for p in pts], marker="o", capsize=3, label=legend
            )
        ax.set_xlabel("training step")
        ax.set_ylabel(m)
        _log_y_if_wide(ax, [v for (lab, _), g in by_step.items() for v in g.get(m, [])])
        ax.grid(alpha=0.3)
        if len(labels) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}_curve_{_safe(m)}.png"), dpi=120)
        plt.close(fig)


def _log_y_if_wide(ax, values: Sequence[float]) -> None:
    """A metric spanning two decades or more (bits/dim of respaced chains, FID of early checkpoints) on a log axis."""
    values = [v for v in values if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) >= 100:
        ax.set_yscale("log")


def _plots(labels, metrics, groups, keys, out, name) -> None:
    if not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_values = list(dict.fromkeys(label[-1] for label in labels))
    try:
        xs = [float(v) for v in x_values]
        numeric = True
    except ValueError:
        xs, numeric = list(range(len(x_values))), False
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        lines = list(dict.fromkeys(label[:-1] for label in labels))
        for line in lines:
            pts = [
                (xs[x_values.index(lab[-1])], *mean_std(groups[lab][m]))
                for lab in labels
                if lab[:-1] == line and m in groups[lab]
            ]
            if not pts:
                continue
            legend = ", ".join(f"{k}={v}" for k, v in zip(keys[:-1], line)) or m
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=legend
            )
        ax.set_xlabel(keys[-1])
        ax.set_ylabel(m)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, x_values)
        _log_y_if_wide(ax, [v for lab in labels for v in groups[lab].get(m, [])])
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}_{_safe(m)}.png"), dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="FILE or FILE:VARIANT")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeat for more axes)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every cell (repeatable)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval", default="fid_domain", help=f"comma list of {list(EVALUATORS)}")
    p.add_argument("--out", required=True)
    p.add_argument("--curve", action="store_true", help="also evaluate every kept checkpoint (learning curves)")
    p.add_argument("--table", default="table", help="stem of this invocation's outputs in OUT (default: table)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    args = p.parse_args(argv)
    from research.config import ConfigError

    try:
        seeds = [int(s) for s in split_values(args.seeds)]
    except (ValueError, SweepError):
        print(f"error: --seeds {args.seeds!r}: give integers, e.g. 0,1,2", file=sys.stderr)
        return 2
    evals = [e for e in args.eval.split(",") if e]
    try:
        if args.dry_run:
            cells = plan_cells(args.config, args.grid, args.set, seeds)
            names = list(dict.fromkeys(c.train_name for c in cells))
            print(f"{len(cells)} cells, {len(names)} training runs:")
            for c in cells:
                print(f"  {c.train_name}  {_options_text(c)}")
            return 0
        run_sweep(args.config, args.grid, args.set, seeds, evals, args.out, curve=args.curve, name=args.table)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, f"{args.table}.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
