"""The command-line entry points: train, sample, summary."""

import os
import subprocess
import sys

import numpy as np
import pytest

from research import sample as sample_cli
from research import summary as summary_cli
from research.config import get_config
from research.train.loop import abstract_params, model_from_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_train_cli_rejects_unknown_key_with_suggestion(tmp_path):
    r = _run("-m", "research.train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path),
             "--config.optim.lrr=1e-3")
    assert r.returncode == 2
    assert "unknown config key 'optim.lrr'" in r.stderr and "did you mean 'optim.lr'" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_cli_help_lists_keys():
    r = _run("-m", "research.train", "--help")
    assert r.returncode == 0 and "--config.optim.lr=" in r.stdout and "--config.sample.eta=" in r.stdout


def test_ddpm_cifar10_config_matches_paper_size():
    config = get_config(os.path.join(ROOT, "configs/ddpm_cifar10.py"))
    n = sum(leaf.size for leaf in __import__("jax").tree.leaves(abstract_params(model_from_config(config), config)))
    # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model.
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n
    assert (config.diffusion.beta_start, config.diffusion.beta_end, config.diffusion.timesteps) == (1e-4, 0.02, 1000)
    assert (config.optim.lr, config.train.batch_size, config.optim.warmup_steps, config.train.ema_decay,
            config.model.dropout, tuple(config.model.ch_mult)) == (2e-4, 128, 5000, 0.9999, 0.1, (1, 2, 2, 2))


def test_summary_prints_params_and_flops(capsys):
    assert summary_cli.main(["--config", os.path.join(ROOT, "configs/quickstart.py")]) == 0
    out = capsys.readouterr().out
    params = int(out.split("params: ")[1].split()[0])
    gflops = float(out.split("gflops: ")[1].split()[0])
    config = get_config(os.path.join(ROOT, "configs/quickstart.py"))
    assert params == sum(x.size for x in __import__("jax").tree.leaves(
        abstract_params(model_from_config(config), config)))
    # Lower bound from the convolutions alone: every 3x3 conv costs 2*9*Cin*Cout per output pixel.
    ch = config.model.ch
    conv_in = 2 * 9 * 1 * ch * 8 * 8
    assert gflops * 1e9 > 10 * conv_in


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import make_tiny_config
    workdir = str(tmp_path_factory.mktemp("run"))
    train(make_tiny_config(), workdir, stop_at=3)
    return workdir


@pytest.mark.parametrize("sampler,steps", [("ddim", "10"), ("ddpm", "ddim5")])
def test_sample_cli_writes_grid_and_npz(trained_run, tmp_path, sampler, steps):
    workdir = trained_run
    out = str(tmp_path / "out")
    args = ["--workdir", workdir, "--sampler", sampler, "--steps", steps, "--num", "10", "--batch-size", "8",
            "--out", out]
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
    assert evaluate.main(["bpd", "--workdir", trained_run, "--steps", "10", "--num", "6", "--batch-size", "4",
                          "--split", "test"]) == 0
    import json
    result = json.load(open(os.path.join(trained_run, "eval", "bpd_10.json")))
    assert result["num_steps"] == 10 and result["num_images"] == 6 and len(result["terms_bpd"]) == 10
    # total = prior + all terms, averaged over images
    assert np.isfinite(result["bpd"]) and result["bpd"] > 0
    np.testing.assert_allclose(result["bpd"], result["prior_bpd"] + sum(result["terms_bpd"]), rtol=1e-5)
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.parametrize("variant,var_type,loss", [("cosine-hybrid", "learned_range", "hybrid"),
                                                   ("linear-simple", "fixed_small", "simple"),
                                                   ("cosine-vlb", "learned_range", "vlb"),
                                                   ("linear-simple-fixedlarge", "fixed_large", "simple")])
def test_iddpm_mnist_variants(variant, var_type, loss):
    c = get_config(os.path.join(ROOT, "configs/iddpm_mnist.py") + ":" + variant)
    assert (c.diffusion.schedule, c.diffusion.var_type, c.diffusion.loss) == (variant.split("-")[0], var_type, loss)
    assert c.diffusion.t_sampling == ("importance" if loss == "vlb" else "uniform")


def test_iddpm_cifar10_config_is_the_paper_recipe():
    c = get_config(os.path.join(ROOT, "configs/iddpm_cifar10.py"))
    assert (c.diffusion.timesteps, c.diffusion.schedule, c.diffusion.loss, c.diffusion.vlb_weight) == (
        4000, "cosine", "hybrid", 0.001)
    assert (c.model.num_res_blocks, c.model.dropout, c.optim.lr, c.train.batch_size) == (3, 0.3, 1e-4, 128)
    assert c.diffusion.var_type == "learned_range"


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(Exception, match="unknown variant 'cosine-l2'"):
        get_config(os.path.join(ROOT, "configs/iddpm_mnist.py") + ":cosine-l2")
