"""The evaluation commands and the sampler-comparison harness, end to end on digits with the domain classifier."""

import csv
import json
import os

import numpy as np
import pytest

from research.metrics import fid as fid_lib


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache directory for the module: the digits classifier is trained once (seconds)."""
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("RESEARCH_CACHE_DIR")
    os.environ["RESEARCH_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("RESEARCH_CACHE_DIR", None)
    else:
        os.environ["RESEARCH_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache):
    from research.train.loop import train
    from tests.factories import make_tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    config = make_tiny_config()
    config.train.progress = False
    train(config, workdir)
    return workdir


def test_dataset_specs_and_image_sources(tmp_path):
    from research.metrics.evaluation import EvaluationError, load_images, parse_dataset_spec

    spec = parse_dataset_spec("digits:test:40")
    assert (spec.name, spec.split, spec.num) == ("digits", "test", 40)
    for bad in ("digits:test:0", "digits:test:x", "a:b:c:d"):
        with pytest.raises(EvaluationError):
            parse_dataset_spec(bad)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=images)
    np.testing.assert_array_equal(load_images(str(tmp_path / "s.npz")), images)
    from PIL import Image

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
    np.testing.assert_array_equal(load_images(str(folder)), images)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(EvaluationError, match="statistics"):
        load_images(str(tmp_path / "stats.npz"))
    with pytest.raises(EvaluationError, match="does not exist"):
        load_images(str(tmp_path / "missing.npz"))


def test_fid_command_equals_direct_computation(tmp_path, cache, capsys):
    from research.evaluate import main
    from research.metrics.classifier import get_domain_classifier
    from research.metrics.evaluation import DatasetSpec, dataset_images

    test_images, _ = dataset_images(DatasetSpec("digits", "test"))
    # Pixels shuffled within each image: the intensity histogram of digits, none of their shapes.
    noisy = (
        np.random.default_rng(1).permuted(test_images.reshape(len(test_images), -1), axis=1).reshape(test_images.shape)
    )
    np.savez(tmp_path / "noisy.npz", images=noisy)
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "fid",
                "--samples",
                str(tmp_path / "noisy.npz"),
                "--ref",
                "digits:train",
                "--metric",
                "domain",
                "--kid",
                "--pr",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.load(open(out))
    clf = get_domain_classifier("digits", progress=False)
    train_images, _ = dataset_images(DatasetSpec("digits", "train"))
    fa, fb = clf.features(noisy, progress=False), clf.features(train_images, progress=False)
    direct = fid_lib.frechet_distance(*fid_lib.feature_statistics(fa), *fid_lib.feature_statistics(fb))
    assert result["fid"] == pytest.approx(direct, rel=1e-6)
    assert result["kid"] == pytest.approx(fid_lib.kid(fa, fb)[0], rel=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(fid_lib.precision_recall(fb, fa), rel=1e-9)
    assert "classifier" in capsys.readouterr().out  # the protocol line names the feature space

    # The floor (real test vs real train) is far below the noisy images' FID; a stats file stands in for a split.
    assert main(["stats", "digits:train", "--metric", "domain", "--out", str(tmp_path / "train_stats.npz")]) == 0
    assert (
        main(
            [
                "fid",
                "digits:test",
                str(tmp_path / "train_stats.npz"),
                "--metric",
                "domain",
                "--domain",
                "digits",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    floor = json.load(open(out))["fid"]
    fc = clf.features(test_images, progress=False)
    assert floor == pytest.approx(
        fid_lib.frechet_distance(*fid_lib.feature_statistics(fc), *fid_lib.feature_statistics(fb)), rel=1e-6
    )
    assert floor < 0.5 * result["fid"]


def test_fid_command_errors(tmp_path, cache, capsys):
    from research.evaluate import main

    assert main(["fid", "digits:test"]) == 2
    assert "two sources" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "nope.npz"), "digits:train", "--metric", "domain"]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--metric", "domain"]) == 2
    assert "--domain" in capsys.readouterr().err
    # A missing data folder names this command's flag, not the training command's.
    np.savez(tmp_path / "b.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    assert (
        main(
            [
                "fid",
                str(tmp_path / "b.npz"),
                "mnist:train:10",
                "--metric",
                "domain",
                "--domain",
                "mnist",
                "--data-dir",
                str(tmp_path / "no_mnist"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no_mnist" in err and "--data-dir" in err and "--config.data" not in err, err


def test_compare_samplers_harness(trained_run, cache, tmp_path):
    from experiments.compare_samplers import main
    from research.metrics.classifier import get_domain_classifier
    from research.metrics.evaluation import DatasetSpec, dataset_images

    out = str(tmp_path / "cmp")
    args = [
        "--workdir",
        trained_run,
        "--samplers",
        "ddpm,ddim",
        "--eta",
        "0,1",
        "--steps",
        "2,5",
        "--num",
        "24",
        "--metric",
        "fid_domain",
        "--batch-size",
        "12",
        "--out",
        out,
        "--no-progress",
    ]
    assert main(args) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "compare_samplers.csv"))))
    # ddpm x 2 steps + ddim x 2 etas x 2 steps, NFE = steps.
    assert [(r["sampler"], r["eta"], int(r["steps"])) for r in rows] == [
        ("ddpm", "", 2),
        ("ddpm", "", 5),
        ("ddim", "0.0", 2),
        ("ddim", "0.0", 5),
        ("ddim", "1.0", 2),
        ("ddim", "1.0", 5),
    ]
    assert all(int(r["nfe"]) == int(r["steps"]) for r in rows)
    md = open(os.path.join(out, "compare_samplers.md")).read()
    assert "Protocol" in md and "digits:train" in md and "Floors" in md
    assert os.path.getsize(os.path.join(out, "compare_samplers.png")) > 0

    # The table's FID is the distance of the saved samples' features to the reference, recomputed here.
    clf = get_domain_classifier("digits", progress=False)
    ref, _ = dataset_images(DatasetSpec("digits", "train"))
    cell = np.load(os.path.join(out, "cells", "ddim_eta0_steps5_n24_seed0.npz"))
    assert cell["images"].shape == (24, 8, 8, 1) and int(cell["nfe"]) == 5
    direct = fid_lib.frechet_distance(
        *fid_lib.feature_statistics(clf.features(cell["images"], progress=False)),
        *fid_lib.feature_statistics(clf.features(ref, progress=False)),
    )
    assert float(rows[3]["fid_domain"]) == pytest.approx(direct, rel=1e-6)
    # Cells differ only by the sampler: DDIM eta=0 and eta=1 at the same steps give different samples.
    other = np.load(os.path.join(out, "cells", "ddim_eta1_steps5_n24_seed0.npz"))["images"]
    assert not np.array_equal(cell["images"], other)

    # A rerun reuses every cached cell (no sampling, same numbers).
    mtimes = {n: os.path.getmtime(os.path.join(out, "cells", n)) for n in os.listdir(os.path.join(out, "cells"))}
    assert main(args) == 0
    assert mtimes == {n: os.path.getmtime(os.path.join(out, "cells", n)) for n in mtimes}
    assert list(csv.DictReader(open(os.path.join(out, "compare_samplers.csv")))) == rows


def test_compare_samplers_rejects_bad_requests(trained_run, cache, capsys):
    from experiments.compare_samplers import main

    assert main(["--workdir", trained_run, "--samplers", "euler", "--no-progress"]) == 2
    assert "samplers must be" in capsys.readouterr().err
    assert main(["--workdir", trained_run, "--steps", "5000", "--metric", "fid_domain", "--no-progress"]) == 2
    assert "exceed" in capsys.readouterr().err
