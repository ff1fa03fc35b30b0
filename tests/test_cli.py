"""The command-line entry points: train, sample, summary."""

import os
import subprocess
import sys

import numpy as np
import pytest

from research import sample as sample_cli
from research import summary as summary_cli
from research.shapes import abstract_net_params, build_network
from research.tasks import get_config
from research.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_train_cli_rejects_unknown_key_with_suggestion(tmp_path):
    r = _run(
        "-m",
        "research.train",
        "--config",
        "configs/quickstart.py",
        "--workdir",
        str(tmp_path),
        "--config.optim.lrr=1e-3",
    )
    assert r.returncode == 2
    assert "unknown config key 'optim.lrr'" in r.stderr and "did you mean 'optim.lr'" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_cli_help_lists_keys():
    r = _run("-m", "research.train", "--help")
    assert r.returncode == 0 and "--config.optim.lr=" in r.stdout and "--config.sample.eta=" in r.stdout


def test_ddpm_cifar10_config_matches_paper_size():
    config = get_config(os.path.join(ROOT, "configs/ddpm_cifar10.py"))
    n = sum(leaf.size for leaf in __import__("jax").tree.leaves(abstract_net_params(build_network(config), config)))
    # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model.
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n
    assert (config.diffusion.beta_start, config.diffusion.beta_end, config.diffusion.timesteps) == (1e-4, 0.02, 1000)
    assert (
        config.optim.lr,
        config.train.batch_size,
        config.optim.warmup_steps,
        config.train.ema_decay,
        config.model.dropout,
        tuple(config.model.ch_mult),
    ) == (2e-4, 128, 5000, 0.9999, 0.1, (1, 2, 2, 2))


def test_summary_prints_params_and_flops(capsys):
    assert summary_cli.main(["--config", os.path.join(ROOT, "configs/quickstart.py")]) == 0
    out = capsys.readouterr().out
    params = int(out.split("params: ")[1].split()[0])
    gflops = float(out.split("gflops: ")[1].split()[0])
    config = get_config(os.path.join(ROOT, "configs/quickstart.py"))
    assert params == sum(
        x.size for x in __import__("jax").tree.leaves(abstract_net_params(build_network(config), config))
    )
    # Lower bound from the convolutions alone: every 3x3 conv costs 2*9*Cin*Cout per output pixel.
    ch = config.model.ch
    conv_in = 2 * 9 * 1 * ch * 8 * 8
    assert gflops * 1e9 > 10 * conv_in


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.factories import make_tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    train(make_tiny_config(), workdir, stop_at=3)
    return workdir


@pytest.mark.parametrize("sampler,steps", [("ddim", "10"), ("ddpm", "ddim5")])
def test_sample_cli_writes_grid_and_npz(trained_run, tmp_path, sampler, steps):
    workdir = trained_run
    out = str(tmp_path / "out")
    args = [
        "--workdir",
        workdir,
        "--sampler",
        sampler,
        "--steps",
        steps,
        "--num",
        "10",
        "--batch-size",
        "8",
        "--out",
        out,
    ]
    assert sample_cli.main(args + ["--seed", "1"]) == 0
    stem = os.path.join(out, f"samples_{sampler}_{steps}_eta0_seed1")
    data = np.load(stem + ".npz")
    assert data["images"].shape == (10, 8, 8, 1) and data["images"].dtype == np.uint8
    assert int(data["nfe"]) == (10 if steps == "10" else 5)
    assert int(data["step"]) == 3
    assert os.path.getsize(stem + ".png") > 100
    # Same seed, same samples; another seed, other samples.
    assert sample_cli.main(args + ["--seed", "1", "--out", str(tmp_path / "again")]) == 0
    again = np.load(os.path.join(tmp_path / "again", os.path.basename(stem) + ".npz"))
    np.testing.assert_array_equal(data["images"], again["images"])
    assert sample_cli.main(args + ["--seed", "2"]) == 0
    other = np.load(stem.replace("seed1", "seed2") + ".npz")
    assert np.abs(other["images"].astype(int) - data["images"].astype(int)).mean() > 1


def test_sample_cli_reports_missing_run(tmp_path, capsys):
    assert sample_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_evaluate_bpd_cli_writes_finite_bound(trained_run, capsys):
    from research import evaluate

    assert (
        evaluate.main(
            ["bpd", "--workdir", trained_run, "--steps", "10", "--num", "6", "--batch-size", "4", "--split", "test"]
        )
        == 0
    )
    import json

    result = json.load(open(os.path.join(trained_run, "eval", "bpd_10.json")))
    assert result["num_steps"] == 10 and result["num_images"] == 6 and len(result["terms_bpd"]) == 10
    # total = prior + all terms, averaged over images
    assert np.isfinite(result["bpd"]) and result["bpd"] > 0
    np.testing.assert_allclose(result["bpd"], result["prior_bpd"] + sum(result["terms_bpd"]), rtol=1e-5)
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.parametrize(
    "variant,var_type,loss",
    [
        ("cosine-hybrid", "learned_range", "hybrid"),
        ("linear-simple", "fixed_small", "simple"),
        ("cosine-vlb", "learned_range", "vlb"),
        ("linear-simple-fixedlarge", "fixed_large", "simple"),
    ],
)
def test_iddpm_mnist_variants(variant, var_type, loss):
    c = get_config(os.path.join(ROOT, "configs/iddpm_mnist.py") + ":" + variant)
    assert (c.diffusion.schedule, c.diffusion.var_type, c.diffusion.loss) == (variant.split("-")[0], var_type, loss)
    assert c.diffusion.t_sampling == ("importance" if loss == "vlb" else "uniform")


def test_iddpm_cifar10_config_is_the_paper_recipe():
    c = get_config(os.path.join(ROOT, "configs/iddpm_cifar10.py"))
    assert (c.diffusion.timesteps, c.diffusion.schedule, c.diffusion.loss, c.diffusion.vlb_weight) == (
        4000,
        "cosine",
        "hybrid",
        0.001,
    )
    assert (c.model.num_res_blocks, c.model.dropout, c.optim.lr, c.train.batch_size) == (3, 0.3, 1e-4, 128)
    assert c.diffusion.var_type == "learned_range"


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(Exception, match="unknown variant 'cosine-l2'"):
        get_config(os.path.join(ROOT, "configs/iddpm_mnist.py") + ":cosine-l2")


def _one_error_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert needle in err, err


def _fake_run(tmp_path, name, **fields):
    """A workdir holding only a config.json (the checks under test run before any weights are read)."""
    from tests.factories import make_tiny_config

    config = make_tiny_config()
    for key, value in fields.items():
        section, leaf = key.split(".") if "." in key else (None, key)
        if section is None:
            config[leaf] = value
        else:
            config[section][leaf] = value
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return str(workdir)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num", "0"], "--num must be >= 1"),
        (["--num", "-3"], "--num must be >= 1"),
        (["--eta", "-1"], "--eta must be >= 0"),
        (["--eta", "nan"], "--eta must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--step", "-2"], "--step must be a checkpoint step"),
        (["--step", "999"], "no checkpoint at step 999"),
        (["--steps", "0"], "steps"),
        (["--steps", "abc"], "steps"),
        (["--steps", "5000"], "steps"),
    ],
)
def test_sample_cli_edge_values(trained_run, tmp_path, capsys, extra, needle):
    assert sample_cli.main(["--workdir", trained_run, "--out", str(tmp_path / "o")] + extra) == 2
    _one_error_line(capsys, needle)


def test_sample_cli_refuses_runs_without_a_sampler_and_few_step_options(tmp_path, capsys):
    autoencoder = _fake_run(tmp_path, "ae", task="autoencoder")
    with open(os.path.join(autoencoder, "config.json")) as f:
        text = f.read()
    # an autoencoder config needs its model section; the refusal comes from the task before any weights are read
    import json

    from tests.factories import make_tiny_vae_config

    data = json.loads(text)
    data["model"] = json.loads(make_tiny_vae_config().to_json_best_effort())["model"]
    with open(os.path.join(autoencoder, "config.json"), "w") as f:
        json.dump(data, f)
    assert sample_cli.main(["--workdir", autoencoder]) == 2
    _one_error_line(capsys, "holds an autoencoder, which has no sampler")
    fewstep = _fake_run(tmp_path, "ct", **{"task": "fewstep", "fewstep.method": "ct", "diffusion.prediction": "v"})
    assert sample_cli.main(["--workdir", fewstep, "--sampler", "ddim"]) == 2
    _one_error_line(capsys, "has its own sampler")
    assert sample_cli.main(["--workdir", fewstep, "--steps", "0"]) == 2
    _one_error_line(capsys, "--steps must be >= 1")


def test_sample_stores_labels_for_every_model(trained_run, tmp_path):
    """One policy: labels always stored; unconditional models get -1 (class-conditional ones cycle the classes:
    tests/test_fewstep_train.py and tests/test_latent.py)."""
    out = str(tmp_path / "o")
    assert sample_cli.main(["--workdir", trained_run, "--num", "3", "--steps", "5", "--out", out]) == 0
    data = np.load(os.path.join(out, "samples_ddim_5_eta0_seed0.npz"))
    np.testing.assert_array_equal(data["labels"], [-1, -1, -1])


def test_damaged_newest_checkpoint_is_named_and_skipped(trained_run, tmp_path, capsys, caplog):
    """Overwriting one file of the newest checkpoint: sampling falls back to the newest intact one (a warning
    names the damaged step), asking for the damaged step is one clear error, and training resumes from the
    intact one."""
    import shutil

    from research.run import checkpoint_steps

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained_run, workdir)
    from tests.factories import make_tiny_config

    config = make_tiny_config()
    train(config, workdir, stop_at=6)
    assert checkpoint_steps(workdir) == [3, 6]
    with open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata"), "wb") as f:
        f.write(b"\xff\xfe garbage")
    out = str(tmp_path / "o")
    with caplog.at_level("WARNING", logger="research"):
        assert sample_cli.main(["--workdir", workdir, "--num", "2", "--steps", "5", "--out", out]) == 0
    assert "step 6" in caplog.text and "damaged" in caplog.text
    assert int(np.load(os.path.join(out, "samples_ddim_5_eta0_seed0.npz"))["step"]) == 3
    assert sample_cli.main(["--workdir", workdir, "--step", "6", "--out", out]) == 2
    _one_error_line(capsys, "step 6")
    result = train(config, workdir)  # resumes from the intact step 3 and finishes
    assert result["step"] == 6


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "both --config FILE and --workdir DIR are required"),
        (["--config", "configs/nope.py", "--workdir", "w"], "does not exist"),
        (["--config", "README.md", "--workdir", "w"], "not a Python file"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--config.train.num_steps=0"], "train.num_steps"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--config.train.num_steps=-5"], "train.num_steps"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--config.optim.lrr=1"], "did you mean 'optim.lr'"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--config.optim.lr=abc"], "--config.optim.lr"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--config.train.num_devices=-1"], "num_devices"),
        (
            ["--config", "configs/quickstart.py", "--workdir", "w", "--config.train.sharding_rules=(('(', 'fsdp'),)"],
            "regex",
        ),
        (["--config", "configs/iddpm_mnist.py:nosuchvariant", "--workdir", "w"], "nosuchvariant"),
        (["--config", "configs/quickstart.py", "--workdir", "w", "--bogus"], "unrecognised arguments"),
    ],
)
def test_train_cli_edge_values(tmp_path, capsys, monkeypatch, argv, needle):
    from research.train.__main__ import main as train_main

    monkeypatch.chdir(ROOT)
    argv = [str(tmp_path / a) if a == "w" else a for a in argv]
    assert train_main(argv) == 2
    _one_error_line(capsys, needle)
    assert not os.path.exists(tmp_path / "w")
