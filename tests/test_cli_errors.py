"""User errors of the evaluation commands: each is one `error: ...` line on stderr and exit status 2, never a
traceback; plus the numbers behind the fixes (float image conversion, bits/dim of [0, 1] runs, the FID floor plan).

Commands: research.evaluate fid|stats|bpd, research.summary, experiments.compare_samplers,
research.metrics.convert_inception, research.pretrained.convert_vae.
"""

import json
import math
import os

import numpy as np
import pytest

from research.metrics.evaluation import DatasetSpec

DIGITS_TEST = 297  # images in the digits test split


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits run trained for a few steps (shared by every test here that needs weights)."""
    from research.train.loop import train
    from tests.factories import make_tiny_config

    config = make_tiny_config()
    config.train.num_steps = 3
    workdir = str(tmp_path_factory.mktemp("cli_errors") / "run")
    train(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Inputs of every kind the commands may be handed by mistake."""
    d = tmp_path_factory.mktemp("inputs")
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    np.savez(d / "images.npz", images=images)
    np.savez(d / "one.npz", images=images[:1])
    np.savez(d / "objects.npz", images=np.array([np.zeros((2, 2)), "a"], dtype=object))
    np.savez(d / "float255.npz", images=np.linspace(0, 300, 20 * 64).reshape(20, 8, 8, 1).astype(np.float32))
    (d / "text.npz").write_text("not an archive")
    (d / "notes.txt").write_text("hello")
    (d / "empty_dir").mkdir()
    (d / "run_no_config").mkdir()
    (d / "nonempty").mkdir()
    (d / "nonempty" / "x").write_text("x")
    for name, values in (
        ("fewstep", {"task": "fewstep"}),
        ("autoencoder", {"task": "autoencoder"}),
        ("latent", {"latent": {"autoencoder": "/some/autoencoder"}}),
        ("digits", {"data": {"name": "digits"}, "diffusion": {"timesteps": 100}}),
    ):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(values))
    (d / "vae").mkdir()
    (d / "vae" / "config.json").write_text("{}")
    (d / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (d / "broken.py").write_text("def get_config(:\n")
    return d


def _one_error_line(capsys, code, *needles):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------- defect 1, 2


def test_fid_refuses_files_that_are_not_image_archives(files, capsys):
    from research.evaluate import main

    line = _one_error_line(capsys, main(["fid", str(files / "objects.npz"), "digits:train"]), "objects.npz")
    assert "not an .npz of uint8 images [N,H,W,C] (it holds object arrays)" in line
    line = _one_error_line(capsys, main(["fid", str(files / "text.npz"), "digits:train"]), "text.npz")
    assert "not an .npz of uint8 images [N,H,W,C] (it is not a zip archive)" in line


def test_float_images_are_converted_by_their_range(tmp_path, capsys):
    """[0, 1] -> round(255 x), [-1, 1] -> round(127.5 (x + 1)), each announced in one line; the uint8 images the
    floats were made from come back exactly."""
    from research.evaluate import _resolve

    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 0, 255  # both ends of the range present
    for name, floats, text in (("unit", images / 255.0, "in [0, 1]"), ("signed", images / 127.5 - 1.0, "in [-1, 1]")):
        path = tmp_path / f"{name}.npz"
        np.savez(path, images=floats.astype(np.float32))
        kind, got, count = _resolve(str(path), None)
        assert (kind, count) == ("images", 6) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, images)
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and out[0].startswith("note: ") and text in out[0], out


def test_float_images_out_of_every_convention_are_refused(files, capsys):
    from research.evaluate import main

    line = _one_error_line(capsys, main(["fid", str(files / "float255.npz"), "digits:train"]), "float255.npz")
    assert "expected uint8 pixels" in line and "[0, 300]" in line


# ----------------------------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize(
    "run, needle",
    [("fewstep", "task='fewstep'"), ("autoencoder", "task='autoencoder'"), ("latent", "latent diffusion run")],
)
def test_bpd_refuses_runs_without_a_pixel_bound(files, capsys, run, needle):
    from research.evaluate import main

    _one_error_line(capsys, main(["bpd", "--workdir", str(files / run)]), needle)


def _hand_decoder_bpd_unit_range(x0, mean, log_var):
    """-log2 P(x0) per dim of [0, 1] data on the grid k/255 under N(mean, exp(log_var)), bins of width 1/255
    (edges to -inf at 0 and +inf at 1), with DDPM's tanh CDF; float64 numpy, no change of coordinates."""

    def cdf(z):
        return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    x0, mean, std = (np.asarray(a, np.float64) for a in (x0, mean, np.exp(0.5 * np.asarray(log_var, np.float64))))
    upper = np.where(x0 > 1 - 1e-6, 1.0, cdf((x0 + 0.5 / 255 - mean) / std))
    lower = np.where(x0 < 1e-6, 0.0, cdf((x0 - 0.5 / 255 - mean) / std))
    p = np.maximum(upper - lower, 1e-12)
    return -np.log2(p).reshape(len(x0), -1).mean(1)


def test_bpd_of_an_uncentered_run(trained_run):
    """A run with data.centered=False feeds [0, 1] images to its model; the decoder term is the discretised
    Gaussian on the [0, 1] grid. Ours = the likelihood module's KL terms and prior + a hand-computed [0, 1]
    decoder, and differs from taking the [-1, 1] decoder on [0, 1] data as it is."""
    import jax
    import jax.numpy as jnp

    from research.data import to_model_range
    from research.diffusion import gaussian, likelihood
    from research.evaluate import decoder_bpd, evaluate_bpd
    from research.loader import load_run
    from research.sampling import make_denoiser, sampling_schedule, schedule_from_config

    config, model, params, _ = load_run(trained_run)
    images = DIGITS_IMAGES()[:8]
    steps = "10"
    schedule = sampling_schedule(schedule_from_config(config.diffusion), steps)
    denoise = make_denoiser(model, params)
    d = config.diffusion
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # evaluate_bpd's key for batch 0

    # Centred data: the step-0 reconstruction reproduces the likelihood module's decoder column exactly.
    x_c = jnp.asarray(to_model_range(images, centered=True))
    ref = likelihood.bits_per_dim(denoise, schedule, x_c, key, prediction=d.prediction, var_type=d.var_type)
    ours_c = decoder_bpd(denoise, schedule, x_c, key, prediction=d.prediction, var_type=d.var_type, centered=True)
    np.testing.assert_allclose(np.asarray(ours_c), np.asarray(ref["vlb_terms"][:, 0]), rtol=1e-6)

    uncentered = config.copy_and_resolve_references()
    uncentered.data.centered = False
    result = evaluate_bpd(model, params, uncentered, images, steps=steps, batch_size=8, progress=False)

    x_u = jnp.asarray(to_model_range(images, centered=False))
    naive = likelihood.bits_per_dim(denoise, schedule, x_u, key, prediction=d.prediction, var_type=d.var_type)
    t = jnp.zeros((len(images),), jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, 0), x_u.shape, x_u.dtype)
    x_1 = gaussian.q_sample(schedule, x_u, t, noise)
    pred = gaussian.interpret_output(
        schedule,
        x_1,
        t,
        denoise(x_1, jnp.asarray(schedule.timesteps)[t], None),
        prediction=d.prediction,
        var_type=d.var_type,
    )
    mean, _, _ = gaussian.q_posterior(schedule, pred.x0, x_1, t)
    hand = _hand_decoder_bpd_unit_range(x_u, mean, np.broadcast_to(pred.log_variance, x_u.shape))
    expected = np.asarray(naive["total"]) - np.asarray(naive["vlb_terms"][:, 0]) + hand
    assert result["bpd"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert result["decoder_bpd"] == pytest.approx(float(hand.mean()), rel=1e-5)
    # The [-1, 1] decoder applied to [0, 1] data (what centred-only code computes) is another number.
    assert abs(float(np.asarray(naive["total"]).mean()) - result["bpd"]) > 0.05


def test_bpd_with_clipped_x0_is_the_clipped_bound_and_refused_for_uncentered_data(trained_run, capsys):
    """`bpd --clip-x0` is likelihood.bits_per_dim with clip_x0 on the same images and keys, written beside the
    unclipped result; [0, 1] data is refused (the clip is to [-1, 1])."""
    import json as json_lib

    import jax
    import jax.numpy as jnp

    from research.data import make_eval_arrays, to_model_range
    from research.diffusion import likelihood
    from research.evaluate import check_bpd_request, main
    from research.loader import load_run
    from research.metrics.evaluation import EvaluationError
    from research.sampling import make_denoiser, sampling_schedule, schedule_from_config

    assert main(["bpd", "--workdir", trained_run, "--steps", "10", "--num", "8", "--batch-size", "8", "--clip-x0"]) == 0
    assert "x0 clipped" in capsys.readouterr().out
    with open(os.path.join(trained_run, "eval", "bpd_10_clip.json")) as f:
        result = json_lib.load(f)
    config, model, params, _ = load_run(trained_run)
    images, _ = make_eval_arrays(config.data, "test", num=8)
    d = config.diffusion
    schedule = sampling_schedule(schedule_from_config(d), "10")
    x0 = jnp.asarray(to_model_range(images, centered=True))
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    bound = {
        clip: likelihood.bits_per_dim(
            make_denoiser(model, params), schedule, x0, key, prediction=d.prediction, var_type=d.var_type, clip_x0=clip
        )
        for clip in (True, False)
    }
    assert result["clip_x0"] is True
    assert result["bpd"] == pytest.approx(float(np.asarray(bound[True]["total"]).mean()), rel=1e-5)
    assert abs(result["bpd"] - float(np.asarray(bound[False]["total"]).mean())) > 1e-3  # the clip is not a no-op
    uncentered = config.copy_and_resolve_references()
    uncentered.data.centered = False
    with pytest.raises(EvaluationError, match="data.centered=False"):
        check_bpd_request(uncentered, trained_run, clip_x0=True)


def DIGITS_IMAGES():
    from research.metrics.evaluation import dataset_images

    return dataset_images(DatasetSpec("digits", "test"))[0]


# ----------------------------------------------------------------------------------------------- defect 4


def test_floor_uses_what_the_split_has():
    from experiments.compare_samplers import plan_floor
    from research.metrics.evaluation import EvaluationError

    spec, text = plan_floor(None, "digits", 500)
    assert spec == DatasetSpec("digits", "test", DIGITS_TEST)
    assert f"floor: {DIGITS_TEST} test images (the split's size; --num is 500) vs the reference" == text
    spec, text = plan_floor(None, "digits", 100)
    assert spec == DatasetSpec("digits", "test", 100) and text == "floor: 100 test images vs the reference"
    spec, text = plan_floor("digits:train", "digits", 100)
    assert spec == DatasetSpec("digits", "train") and "1500 train images" in text
    with pytest.raises(EvaluationError, match="asks for 5000 images but the split has 297"):
        plan_floor("digits:test:5000", "digits", 100)


# ----------------------------------------------------------------------------------------------- defect 6


def _evaluate_cases():
    return [
        (["fid", "{f}/images.npz", "digits:train", "--batch-size", "0"], "--batch-size: must be a positive"),
        (["fid", "{f}/images.npz", "digits:train", "--batch-size", "-5"], "--batch-size: must be a positive"),
        (["fid", "{f}/images.npz", "digits:train", "--kid", "--kid-subset-size", "0"], "--kid-subset-size"),
        (["fid", "{f}/images.npz", "digits:train", "--kid", "--kid-subset-size", "500"], "KID subsets of 500"),
        (["fid", "{f}/one.npz", "digits:train"], "at least 2 images"),
        (["fid", "{f}/missing.npz", "digits:train"], "does not exist"),
        (["fid", "{f}/notes.txt", "digits:train"], "expected an .npz file or a folder"),
        (["fid", "{f}/empty_dir", "digits:train"], "holds no image files"),
        (["fid", "{f}/images.npz", "mnist:nosuchsplit"], "no split 'nosuchsplit'"),
        (["fid", "{f}/images.npz", "mnist:train:-3"], "must be a positive integer"),
        (["fid", "{f}/images.npz", "digits:test:0"], "must be a positive integer"),
        (["fid", "{f}/images.npz", "digits:test:100000"], "asks for 100000 images but the split has 297"),
        (["fid", "{f}/images.npz", "nosuchdata:train"], "unknown data.name"),
        (["fid", "{f}/images.npz", "digits:train", "--json", "{f}/no/such/dir/r.json"], "does not exist"),
        (["fid", "{f}/images.npz", "digits:train", "--metric", "foo"], "invalid choice"),
        (["fid", "{f}/images.npz", "digits:train", "--protocol", "foo"], "--protocol 'foo'"),
        (["fid", "{f}/images.npz"], "two sources"),
        (["stats", "{f}/missing.npz", "--out", "{f}/s.npz"], "does not exist"),
        (["stats", "{f}/images.npz", "--out", "{f}/no/such/dir/s.npz"], "does not exist"),
        (["stats", "{f}/images.npz", "--out", "{f}/empty_dir"], "is a folder"),
        (["stats", "{f}/one.npz", "--out", "{f}/s.npz"], "at least 2 images"),
        (["stats", "{f}/images.npz"], "--out"),
        (["bpd", "--workdir", "{f}/digits", "--num", "0"], "--num: must be a positive"),
        (["bpd", "--workdir", "{f}/digits", "--num", "-5"], "--num: must be a positive"),
        (["bpd", "--workdir", "{f}/digits", "--num", "100000"], "has 297 images"),
        (["bpd", "--workdir", "{f}/digits", "--num", "ten"], "expected a positive integer"),
        (["bpd", "--workdir", "{f}/digits", "--steps", "0"], "--steps 0"),
        (["bpd", "--workdir", "{f}/digits", "--steps", "-5"], "--steps -5"),
        (["bpd", "--workdir", "{f}/digits", "--steps", "ddim0"], "--steps ddim0"),
        (["bpd", "--workdir", "{f}/digits", "--steps", "5000"], "--steps 5000"),
        (["bpd", "--workdir", "{f}/digits", "--batch-size", "0"], "--batch-size: must be a positive"),
        (["bpd", "--workdir", "{f}/digits", "--seed", "-1"], "--seed: must be >= 0"),
        (["bpd", "--workdir", "{f}/digits", "--step", "-1"], "--step: must be >= 0"),
        (["bpd", "--workdir", "{f}/digits", "--split", "nosuchsplit"], "no split 'nosuchsplit'"),
        (["bpd", "--workdir", "{f}/missing_run"], "does not exist"),
        (["bpd", "--workdir", "{f}/run_no_config"], "has no config.json"),
        (["bpd", "--workdir", "{run}", "--step", "999", "--num", "8"], "no checkpoint at step 999"),
        (["nosuchcommand"], "invalid choice"),
    ]


@pytest.mark.parametrize("argv, needle", _evaluate_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_evaluate_edge_values(files, trained_run, capsys, argv, needle):
    from research.evaluate import main

    argv = [a.format(f=files, run=trained_run) for a in argv]
    _one_error_line(capsys, main(argv), needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--config", "{f}/missing.py"], "does not exist"),
        (["--config", "{f}/empty_dir"], "is a folder"),
        (["--config", "{f}/notes.txt"], "not a Python config file"),
        (["--config", "{f}/broken.py"], "syntax error at line 1"),
        (["--config", "configs/quickstart.py", "--config.model.nosuchkey=3"], "nosuchkey"),
        (["--config", "configs/quickstart.py", "--config.diffusion.timesteps=-5"], "timesteps"),
        (["--config", "configs/quickstart.py", "extra"], "unexpected extra"),
        ([], "usage"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_summary_edge_values(files, capsys, argv, needle):
    from research.summary import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [
        a.format(f=files) if "{f}" in a else (os.path.join(root, a) if a.startswith("configs/") else a) for a in argv
    ]
    _one_error_line(capsys, main(argv), needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--num", "0"], "--num: must be a positive"),
        (["--num", "-5"], "--num: must be a positive"),
        (["--steps", "0"], "--steps 0"),
        (["--steps", "-5"], "--steps -5"),
        (["--steps", "ten"], "comma list of ints"),
        (["--steps", "5000"], "exceed the run's 100 timesteps"),
        (["--eta", "-1"], "--eta -1"),
        (["--eta", "2"], "--eta 2"),
        (["--eta", "nan"], "--eta nan"),
        (["--batch-size", "0"], "--batch-size: must be a positive"),
        (["--seed", "-1"], "--seed: must be >= 0"),
        (["--step", "999"], "no checkpoint at step 999"),
        (["--floor", "digits:test:5000"], "asks for 5000 images but the split has 297"),
        (["--floor", "digits:nosuchsplit"], "no split 'nosuchsplit'"),
        (["--ref", "digits:train:-3"], "must be a positive integer"),
        (["--ref", "digits:train:5000"], "asks for 5000 images but the split has 1500"),
        (["--num", "1"], "at least 2 images"),
        (["--out", "{f}/notes.txt"], "--out"),
        (["--samplers", "euler"], "samplers must be"),
        (["--workdir", "{f}/missing_run"], "does not exist"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_compare_samplers_edge_values(files, trained_run, capsys, argv, needle):
    """Every refusal happens before a sample is drawn (no cells folder content is written)."""
    from experiments.compare_samplers import main

    argv = [a.format(f=files) for a in argv]
    base = [
        "--workdir",
        trained_run,
        "--num",
        "20",
        "--steps",
        "2",
        "--metric",
        "fid_domain",
        "--no-progress",
        "--out",
        os.path.join(os.path.dirname(trained_run), "cmp_errors"),
    ]
    _one_error_line(capsys, main(base + argv), needle)
    cells = os.path.join(os.path.dirname(trained_run), "cmp_errors", "cells")
    assert not os.path.isdir(cells) or not os.listdir(cells)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--source", "{f}/missing.pt"], "does not exist"),
        (["--source", "{f}/empty_dir"], "is a folder"),
        (["--source", "{f}/notes.txt", "--out", "{f}/w.npz"], "neither known FID Inception file"),
        (["--out", "{f}/empty_dir"], "--out"),
        (["--out", "{f}/w.txt"], "name it *.npz"),
        (["--out", "{f}/no/such/dir/w.npz"], "does not exist"),
        (["--nosuchflag"], "unrecognized arguments"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_convert_inception_edge_values(files, capsys, argv, needle):
    from research.metrics.convert_inception import main

    _one_error_line(capsys, main([a.format(f=files) for a in argv]), needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--diffusers", "{f}/missing_vae"], "does not exist"),
        (["--diffusers", "{f}/notes.txt"], "is a file"),
        (["--diffusers", "{f}/empty_dir"], "config.json is missing"),
        (["--diffusers", "{f}/vae"], "vae"),
        (["--image-size", "0"], "--image-size: must be a positive"),
        (["--image-size", "-8"], "--image-size: must be a positive"),
        (["--scale", "0"], "--scale: must be a positive"),
        (["--scale", "-1"], "--scale: must be a positive"),
        (["--scale", "nan"], "--scale: must be a positive"),
        (["--workdir", "{f}/notes.txt"], "is a file"),
        (["--workdir", "{f}/nonempty"], "not empty"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_convert_vae_edge_values(files, tmp_path, capsys, argv, needle):
    from research.pretrained.convert_vae import main

    args = {"--diffusers": str(files / "vae"), "--workdir": str(tmp_path / "ae"), "--image-size": "32"}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(f=files)
    _one_error_line(capsys, main([x for kv in args.items() for x in kv]), needle)


# ----------------------------------------------------------------------------------------------- defect 7


def test_inception_does_not_import_its_converter():
    """Imports go one way: a fresh interpreter importing inception loads no converter module."""
    import subprocess
    import sys

    code = (
        "import sys; import research.metrics.inception as i; "
        "print('research.metrics.convert_inception' in sys.modules, i.CONVERTER_MODULE)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        check=True,
    ).stdout.split()
    assert out == ["False", "research.metrics.convert_inception"]
    source = open(os.path.join(root, "research", "metrics", "inception.py")).read()
    assert "import convert_inception" not in source and "from research.metrics.convert_inception" not in source


def test_number_lists_parse_every_item_and_refuse_empty_or_malformed_ones(capsys):
    import argparse

    from research.cli import number_list
    from research.sample import main as sample_main

    levels = number_list(float, "noise levels")
    assert levels("80,0.7") == (80.0, 0.7) and levels("2.5") == (2.5,)
    assert number_list(int, "integers")("0,1,2") == (0, 1, 2)
    for bad in ("80,,0.7", "80,", "", "80;0.7", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated noise levels"):
            levels(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated integers, got '1.5'"):
        number_list(int, "integers")("1.5")
    # The sample command refuses a malformed list before it reads the workdir.
    with pytest.raises(SystemExit) as e:
        sample_main(["--workdir", "no/such/run", "--sigmas", "80,,0.7"])
    assert e.value.code == 2 and "--sigmas: expected comma-separated noise levels" in capsys.readouterr().err
