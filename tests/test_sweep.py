"""The sweep runner (experiments/sweep.py): its cells, its statistics, and a killed sweep resuming to the same table."""

import csv
import json
import os
import statistics

import numpy as np
import pytest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from tests.factories import make_tiny_config

VARIANTS = ("small", "wide")


def get_config(variant="small"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    c = make_tiny_config()
    c.model.ch = 16 if variant == "small" else 32
    c.train.num_steps = 8
    c.train.ckpt_every = 4
    c.train.ema_decay = 0.0  # sample the trained weights (an EMA of 8 steps is the initialisation)
    c.sample.steps = "5"
    return c
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny_sweep.py"
    path.write_text(CONFIG)
    return str(path)


def test_cells_are_the_grid_product_and_eval_keys_share_training_runs(config_file):
    cells = sweep.plan_cells(
        config_file,
        ["variant=small,wide", "optim.lr=1e-3,3e-3", "eval.steps=5,10"],
        ["train.batch_size=8", "eval.num=32"],
        [0, 1],
    )
    assert len(cells) == 2 * 2 * 2 * 2
    names = {c.train_name for c in cells}
    assert len(names) == 2 * 2 * 2  # eval.steps adds no training run
    assert "variant=wide+optim.lr=3e-3+seed=1" in names
    cell = cells[0]
    assert cell.variant == "small"
    assert ("train.batch_size", "8") in cell.overrides and ("optim.lr", "1e-3") in cell.overrides
    options = dict(cell.eval_options)
    assert options["steps"] == "5" and options["num"] == 32 and options["bpd_num"] == 200
    assert ("seed", "0") in sweep.cell_overrides(cell)
    # the same grid cell over seeds has the same label (the table's row)
    assert {c.label for c in cells if c.seed == 0} == {c.label for c in cells if c.seed == 1}


def test_values_with_commas_split_on_semicolons(config_file):
    cells = sweep.plan_cells(config_file, ["model.ch_mult=1,2;1,2,2"], [], [0])
    assert [dict(c.overrides)["model.ch_mult"] for c in cells] == ["1,2", "1,2,2"]


def test_consistency_levels_are_an_evaluation_option_that_keeps_older_caches(config_file):
    """eval.sigmas (a consistency run's noise levels) reaches the sampler as numbers, shares the training runs like
    every eval option, splits on ';' in a grid, and enters an evaluation's cache key only when set: the key of an
    evaluation without it is the one sweeps computed before the option existed."""
    import hashlib

    cells = sweep.plan_cells(config_file, ["eval.sigmas=80,0.7;80,1.5"], ["eval.steps=2"], [0])
    assert [dict(c.eval_options)["sigmas"] for c in cells] == ["80,0.7", "80,1.5"]
    assert len({c.train_name for c in cells}) == 1
    assert sweep._sample_options(dict(cells[0].eval_options)).sigmas == (80.0, 0.7)
    plain = dict(sweep.plan_cells(config_file, ["eval.steps=2"], [], [0])[0].eval_options)
    assert sweep._sample_options(plain).sigmas is None
    # the key as computed before eval.sigmas: the five sampling options, hashed in sorted-key JSON
    old = {k: plain[k] for k in ("sampler", "steps", "eta", "guidance", "num")}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    assert sweep._eval_key("fid_domain", plain, 500, 1) == f"fid_domain_step500_seed1_steps2_num1000_{digest}"
    keys = {sweep._eval_key("fid_domain", dict(c.eval_options), 500, 1) for c in cells}
    assert len(keys) == 2 and all("sigmas80" in k for k in keys)
    with pytest.raises(sweep.SweepError, match="expected comma-separated numbers"):
        sweep.plan_cells(config_file, [], ["eval.sigmas=80,high"], [0])


def test_clipped_bits_per_dim_is_an_evaluation_option_keyed_only_when_true(config_file):
    """eval.bpd_clip=true gives the bpd evaluation its own cache entry; false is the unset default (same entry as
    the sweeps cached before the option existed); other words are refused before anything trains."""
    import hashlib

    plain = dict(sweep.plan_cells(config_file, [], [], [0])[0].eval_options)
    old = {k: plain[k] for k in ("steps", "bpd_num")}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    assert sweep._eval_key("bpd", plain, 500, 0) == f"bpd_step500_seed0_bpd_num200_{digest}"
    cells = sweep.plan_cells(config_file, ["eval.bpd_clip=false,true"], [], [0])
    assert [dict(c.eval_options)["bpd_clip"] for c in cells] == [None, True]
    keys = [sweep._eval_key("bpd", dict(c.eval_options), 500, 0) for c in cells]
    assert keys[0] == sweep._eval_key("bpd", plain, 500, 0) and "bpd_clipTrue" in keys[1]
    with pytest.raises(sweep.SweepError, match="expected true or false"):
        sweep.plan_cells(config_file, [], ["eval.bpd_clip=maybe"], [0])


@pytest.mark.parametrize(
    "grids, sets, seeds, words",
    [
        (["optim.lrr=1e-3"], [], [0], "did you mean 'optim.lr'"),
        (["optim.lr=fast"], [], [0], "optim.lr=fast"),  # names the cell
        (["eval.temperature=1"], [], [0], "eval.steps"),
        (["eval.num=many"], [], [0], "expected int"),
        (["eval.num=500,1"], [], [0], "eval.num='1': must be at least 2"),  # FID of one sample
        ([], ["eval.bpd_num=0"], [0], "must be at least 1"),
        (["seed=0,1"], [], [0], "--seeds"),
        (["optim.lr=1e-3", "optim.lr=2e-3"], [], [0], "twice"),
        (["optim.lr=1e-3,"], [], [0], "empty value"),
        (["optim.lr"], [], [0], "KEY=VALUE"),
        (["variant=small,huge"], [], [0], "huge"),
        ([], ["eval.eta"], [0], "KEY=VALUE"),
        ([], [], [], "--seeds"),
    ],
)
def test_bad_sweeps_fail_before_training(config_file, grids, sets, seeds, words):
    with pytest.raises(sweep.SweepError, match=None) as e:
        sweep.plan_cells(config_file, grids, sets, seeds)
    assert words in str(e.value)


def test_mean_and_sample_std_over_seeds():
    values = [3.0, 4.5, 10.0]
    mean, std = sweep.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert std == pytest.approx(statistics.stdev(values))
    assert sweep.mean_std([2.0]) == (2.0, 0.0)
    cases = [((11.9, 0.98), "11.90 ± 0.98"), ((1978.4, 96.2), "1978 ± 96"), ((4.45, 0.02), "4.450 ± 0.020")]
    cases += [((62.0, 0.45), "62.00 ± 0.45"), ((0.5, 0.0123), "0.500 ± 0.012"), ((15.95, 0.0), "15.95 ± 0")]
    for (m, sd), text in cases:
        assert sweep.format_mean_std(m, sd) == text
    assert sweep.format_mean_std(15.95, 0.0, count=1) == "15.95"  # one seed: no spread to report


def test_tables_group_seeds(tmp_path, config_file):
    cells = sweep.plan_cells(config_file, ["optim.lr=1e-3,2e-3"], [], [0, 1, 2])
    rows = [{"cell": c, "metrics": {"fid_domain": 10.0 * (i // 3) + c.seed}} for i, c in enumerate(cells)]
    spec = {"config": config_file, "grid": ["optim.lr=1e-3,2e-3"], "set": [], "seeds": [0, 1, 2], "eval": ["x"]}
    text = sweep.write_tables(rows, ["optim.lr"], str(tmp_path), spec)
    assert "| 1e-3 | 1.0 ± 1.0 | 3 |" in text and "| 2e-3 | 11.0 ± 1.0 | 3 |" in text  # a std of 1 keeps its digit
    csv_lines = (tmp_path / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "optim.lr,fid_domain mean,fid_domain std,seeds"
    assert csv_lines[2] == "2e-3,11,1,3"
    assert (tmp_path / "table_fid_domain.png").stat().st_size > 1000
    one_seed = [r for r in rows if r["cell"].seed == 1]
    text = sweep.write_tables(one_seed, ["optim.lr"], str(tmp_path), {**spec, "seeds": [1]}, name="one")
    assert "| 1e-3 | 1 | 1 |" in text and "| 2e-3 | 11 | 1 |" in text


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(tmp_path, config_file, monkeypatch):
    """Sweep A runs through; sweep B is killed halfway through its second training run (after the checkpoint at step
    4 of 8) and rerun with the same command: its table equals A's, and nothing finished is trained or evaluated
    twice."""
    import research.train.loop as loop

    args = (config_file, ["optim.lr=1e-3,3e-3", "eval.steps=2,5"], ["eval.num=64"], [0], ["loss", "fid_domain"])
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    sweep.run_sweep(*args, out_a, announce=lambda s: None)

    real_train, calls = loop.train, []

    def killed_on_second_run(config, workdir, **kw):
        calls.append(workdir)
        if len(calls) == 2:
            real_train(config, workdir, stop_at=4)
            raise KeyboardInterrupt  # the kill
        return real_train(config, workdir, **kw)

    monkeypatch.setattr(loop, "train", killed_on_second_run)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(*args, out_b, announce=lambda s: None)
    second = calls[1]
    assert os.path.basename(second) == "optim.lr=3e-3+seed=0"
    assert sorted(os.listdir(os.path.join(second, "checkpoints"))) == ["4"]
    assert not os.path.exists(os.path.join(second, "sweep_trained.json"))

    done_evals = {}
    real_evals = dict(sweep.EVALUATORS)
    for name, (fn, deps) in real_evals.items():

        def counted(workdir, options, seed, step, fn=fn, name=name):
            done_evals.setdefault(name, []).append((os.path.basename(workdir), options["steps"]))
            return fn(workdir, options, seed, step)

        monkeypatch.setitem(sweep.EVALUATORS, name, (counted, deps))
    calls.clear()
    monkeypatch.setattr(loop, "train", real_train)
    sweep.run_sweep(*args, out_b, announce=lambda s: None)

    # the first run's evaluations were cached; only the killed run is trained (resumed) and evaluated
    assert {w for ev in done_evals.values() for w, _ in ev} == {"optim.lr=3e-3+seed=0"}
    assert sorted(s for _, s in done_evals["fid_domain"]) == ["2", "5"]
    assert (tmp_path / "a" / "table.csv").read_text() == (tmp_path / "b" / "table.csv").read_text()
    md_a = (tmp_path / "a" / "table.md").read_text().replace(out_a, "OUT")
    assert md_a == (tmp_path / "b" / "table.md").read_text().replace(out_b, "OUT")
    # the metrics differ between the cells (the table is not constant)
    with open(tmp_path / "a" / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and len({row["fid_domain mean"] for row in table}) == 4
    assert len({row["loss mean"] for row in table}) == 2  # one loss per training run

    # another base config into the same folder is refused; part of the grid is read back without any work
    with pytest.raises(sweep.SweepError, match="another --out"):
        sweep.run_sweep(config_file + ":wide", *args[1:], out_b, announce=lambda s: None)
    done_evals.clear()
    monkeypatch.setattr(loop, "train", None)  # would fail if called
    rows = sweep.run_sweep(config_file, ["optim.lr=3e-3", "eval.steps=5"], *args[2:], out_b, announce=lambda s: None)
    assert not done_evals and len(rows) == 1
    assert f"{rows[0]['metrics']['fid_domain']:.6g}" == table[3]["fid_domain mean"]

    # learning curves: every kept checkpoint; the loss at step 4 is the one logged at step 4 (the last 10% of 4 steps)
    # (eval.* options may differ between the invocations that share OUT's runs; --table keeps their outputs apart)
    sweep.run_sweep(config_file, ["optim.lr=3e-3"], [], [0], ["loss"], out_b, curve=True, name="lr", announce=print)
    with open(tmp_path / "b" / "lr_curves.csv") as f:
        curve = {int(r["step"]): float(r["loss mean"]) for r in csv.DictReader(f)}
    with open(os.path.join(second, "metrics.jsonl")) as f:
        logged = {r["step"]: r["loss"] for r in map(json.loads, f)}
    assert sorted(curve) == [4, 8]
    assert curve[4] == pytest.approx(logged[4], rel=1e-5)
    assert curve[8] == pytest.approx(float(table[3]["loss mean"]), rel=1e-5)
    assert (tmp_path / "b" / "lr_curve_loss.png").exists()


@pytest.mark.parametrize("variant", ["linear-simple", "cosine-hybrid"])
def test_iddpm_digits_is_the_quickstart_recipe_with_the_variants_objective(variant):
    from research.tasks import get_config

    digits = get_config(os.path.join(ROOT, "configs/iddpm_digits.py") + ":" + variant)
    quick = get_config(os.path.join(ROOT, "configs/quickstart.py"))
    mnist = get_config(os.path.join(ROOT, "configs/iddpm_mnist.py") + ":" + variant)
    assert digits.data == quick.data and digits.model == quick.model
    assert (digits.optim.lr, digits.train.num_steps, digits.train.ema_decay) == (1e-3, 2000, 0.995)
    assert digits.optim.grad_clip == 1.0
    assert digits.diffusion == mnist.diffusion  # only the objective differs between variants


def test_ldm_digits_variants_differ_only_in_the_space_and_the_steps():
    """The latent-vs-pixel comparison is fair: one recipe, the autoencoder and the step count aside, and the
    latent model's forward pass costs about a quarter of the pixel one's (16 tokens against 64)."""
    from experiments.latent_vs_pixel import training_flops_per_step
    from research.tasks import get_config

    latent, pixel = (get_config(os.path.join(ROOT, f"configs/ldm_digits.py:{v}")) for v in ("latent", "pixel"))
    for section in ("data", "model", "diffusion", "optim", "sample"):
        assert latent[section] == pixel[section], section
    assert latent.optim.lr_schedule == "constant"  # a checkpoint at step k is a k-step run
    assert (latent.train.num_steps, pixel.train.num_steps) == (8000, 2000)
    assert latent.latent.autoencoder == "runs/vae_digits" and pixel.latent.autoencoder == ""
    flops = [training_flops_per_step(c) for c in (pixel, latent)]  # same batch: the ratio of the forward passes
    assert 3.5 < flops[0] / flops[1] < 4.5
    with pytest.raises(ValueError, match="'latent' or 'pixel'"):
        get_config(os.path.join(ROOT, "configs/ldm_digits.py:pixels"))


def test_latent_vs_pixel_pairs_never_give_the_latent_side_more_compute():
    from experiments.latent_vs_pixel import pair_at_equal_compute

    pixel = [(10.0, 500), (20.0, 1000), (3.0, 100)]
    latent = [(5.0, 900), (10.0, 1900), (20.5, 3900), (2.0, 300), (21.0, 4000)]
    pairs = pair_at_equal_compute(pixel, latent)
    assert [(a[1], b[1]) for a, b in pairs] == [(500, 1900), (1000, 1900), (100, 300)]
    assert pair_at_equal_compute([(1.0, 1)], latent) == []


def test_iddpm_ablation_is_a_sweep_preset(tmp_path, capsys):
    from experiments import iddpm_ablation

    out = str(tmp_path / "abl")
    assert iddpm_ablation.main(["--dry-run", "--seeds", "0,1", "--eval-steps", "25,1000", "--out", out]) == 0
    printed = capsys.readouterr().out
    command = printed.splitlines()[0]
    assert command.startswith("python -m experiments.sweep --config configs/iddpm_digits.py")
    assert "variant=linear-simple,linear-hybrid,cosine-simple,cosine-hybrid" in command
    assert "16 cells, 8 training runs:" in printed  # 4 variants x 2 seeds, x 2 step counts for bits/dim
    assert "variant=cosine-hybrid+seed=1  eval.steps=1000" in printed
    with pytest.raises(SystemExit):
        iddpm_ablation.main(["--eval-num", "0", "--dry-run", "--out", out])


def test_logged_scalars_are_evaluations(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "d_accuracy": s / 1000} for s in range(10, 201, 10)]
    rows.append({"step": 200, "d_accuracy": 0.9})  # a resumed run logs a step again: the last one counts
    rows.append({"step": 200, "fid": 3.0})  # rows without the key are skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn, depends_on = sweep.evaluator("log.d_accuracy")
    assert depends_on == ()
    # the last 10% of the logged steps up to the evaluated checkpoint: 2 of 20, then 1 of 10
    assert fn(str(tmp_path), {}, 0, 200) == {"d_accuracy": pytest.approx((0.19 + 0.9) / 2)}
    assert fn(str(tmp_path), {}, 0, 100) == {"d_accuracy": pytest.approx(0.1)}
    assert sweep.eval_loss(str(tmp_path), {}, 0, 200) == {"loss": pytest.approx((1 / 190 + 1 / 200) / 2)}
    assert sweep.evaluator("log.") is None and sweep.evaluator("nope") is None
    with pytest.raises(sweep.SweepError, match="no logged 'r1'"):
        sweep.evaluator("log.r1")[0](str(tmp_path), {}, 0, 200)
    with pytest.raises(sweep.SweepError, match="choose from"):
        sweep.run_sweep("unused.py", [], [], [0], ["fid_domain", "d_accuracy"], str(tmp_path / "out"))


def test_add_ablation_is_a_sweep_preset(capsys):
    from experiments import add_ablation

    assert add_ablation.main(["--dry-run", "--seeds", "0,1", "--steps", "1,4", "--curve", "classifier-l0"]) == 0
    printed = capsys.readouterr().out
    assert "24 cells, 12 training runs:" in printed  # 6 variants x 2 seeds, x 2 student step counts
    assert "variant=classifier-noadv+seed=1  eval.steps=4" in printed
    assert "2 cells, 1 training runs:" in printed  # the learning curve: one variant, the first seed
    assert add_ablation.main(["--dry-run", "--only", "classifier,lambda9"]) == 2
    assert "unknown variants ['lambda9']" in capsys.readouterr().err


def test_plots_put_metrics_spanning_two_decades_on_a_log_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = []
    for values in ([4.4, 62.0, 1978.0], [4.4, 62.0], [0.0, 500.0], [5.0, float("nan"), 900.0]):
        fig, ax = plt.subplots()
        sweep._log_y_if_wide(ax, values)
        scales.append(ax.get_yscale())
        plt.close(fig)
    assert scales == ["log", "linear", "linear", "log"]
