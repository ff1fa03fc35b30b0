"""Domain classifiers: deterministic training, the checksummed cache, accuracy, and the metrics built on them."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from research.data import DataError, make_eval_arrays
from research.metrics import classifier, fid
from research.metrics.classifier import ClassifierError, ClassifierRecipe

# A few seconds of training: enough to test determinism, not accuracy.
TINY = ClassifierRecipe(
    dataset="digits",
    image_size=8,
    channels=1,
    num_classes=10,
    widths=(8, 16),
    convs_per_stage=1,
    feature_dim=16,
    dropout=0.2,
    epochs=2,
    batch_size=32,
    learning_rate=3e-3,
    weight_decay=1e-4,
    max_shift=1,
)
TINY_TRAIN = 256


def _digits(split):
    return make_eval_arrays({"name": "digits"}, split)


def _same_params(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """The real digits classifier, trained once into a temporary cache (the cache variable stays set for the
    module's tests, which reload from it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        start = time.perf_counter()
        clf = classifier.get_domain_classifier("digits", progress=False)
        print(
            f"digits classifier: {clf.test_accuracy:.4f} test accuracy, trained in "
            f"{clf.metadata['train_seconds']} s ({time.perf_counter() - start:.1f} s with evaluation)"
        )
        yield clf


# ----------------------------------------------------------------------------------------------- training


def test_training_is_deterministic():
    params_a, meta_a = classifier.build_classifier(TINY, num_train=TINY_TRAIN, progress=False)
    params_b, meta_b = classifier.build_classifier(TINY, num_train=TINY_TRAIN, progress=False)
    assert meta_a["num_train"] == TINY_TRAIN and meta_a["test_accuracy"] == meta_b["test_accuracy"]
    assert _same_params(params_a, params_b)
    test_images, _ = _digits("test")
    a = classifier.classifier_from_params(TINY, params_a)
    b = classifier.classifier_from_params(TINY, params_b)
    assert a.checksum == b.checksum
    np.testing.assert_array_equal(a.features(test_images), b.features(test_images))
    # Another seed is another network: the test above would notice an ignored seed.
    params_c, _ = classifier.build_classifier(dataclasses.replace(TINY, seed=1), num_train=TINY_TRAIN, progress=False)
    assert not _same_params(params_a, params_c)


_ONE_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    from research.metrics import classifier
    from research.data import make_eval_arrays
    recipe = classifier.ClassifierRecipe(**json.loads(sys.argv[1]))
    params, _ = classifier.build_classifier(recipe, num_train=int(sys.argv[2]), progress=False)
    clf = classifier.classifier_from_params(recipe, params)
    features = clf.features(make_eval_arrays({"name": "digits"}, "test")[0], progress=False)
    print(json.dumps({"devices": jax.device_count(), "checksum": clf.checksum, "features": features.tolist()}))
""")


def test_training_does_not_depend_on_the_number_of_devices():
    # tests/conftest.py simulates 8 CPU devices; the comparison is meaningless with one.
    assert len(jax.devices("cpu")) > 1, "expected the simulated CPU devices of tests/conftest.py"
    params, _ = classifier.build_classifier(TINY, num_train=TINY_TRAIN, progress=False)
    here = classifier.classifier_from_params(TINY, params)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile afresh, not reuse this process's executables
    recipe_json = json.dumps(dataclasses.asdict(TINY))
    out = subprocess.run(
        [sys.executable, "-c", _ONE_DEVICE_SCRIPT, recipe_json, str(TINY_TRAIN)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["devices"] == 1
    assert there["checksum"] == here.checksum
    np.testing.assert_array_equal(np.array(there["features"]), here.features(_digits("test")[0]))


def test_digits_classifier_accuracy_and_metadata(digits_classifier):
    clf = digits_classifier
    assert clf.name == "digits-cnn-v1"
    assert clf.test_accuracy >= 0.95
    meta = clf.metadata
    assert meta["dataset"] == "digits" and meta["num_train"] == 1500 and meta["num_test"] == 297
    assert meta["recipe_sha256"] == classifier.RECIPES["digits"].digest()
    assert meta["train_seconds"] > 0 and meta["sha256"] == clf.checksum
    assert os.path.dirname(clf.path) == os.path.join(os.environ["RESEARCH_CACHE_DIR"], "classifiers")
    # The stored accuracy is the one the loaded network has.
    images, labels = _digits("test")
    assert classifier.classifier_accuracy(clf.probs(images), labels) == clf.test_accuracy


def test_cached_classifier_reloads_identically(digits_classifier, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not trained")

    monkeypatch.setattr(classifier, "build_classifier", no_training)
    again = classifier.get_domain_classifier("digits")
    assert again.checksum == digits_classifier.checksum and again.test_accuracy == digits_classifier.test_accuracy
    images, _ = _digits("test")
    np.testing.assert_array_equal(again.features(images), digits_classifier.features(images))
    np.testing.assert_array_equal(again.probs(images), digits_classifier.probs(images))


def _copy_cache(clf, tmp_path, monkeypatch):
    shutil.copytree(os.path.dirname(clf.path), tmp_path / "classifiers")
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    return str(tmp_path / "classifiers" / "digits-cnn-v1.msgpack"), str(tmp_path / "classifiers" / "digits-cnn-v1.json")


def test_checksum_mismatch_raises(digits_classifier, tmp_path, monkeypatch):
    params_path, _ = _copy_cache(digits_classifier, tmp_path, monkeypatch)
    data = bytearray(open(params_path, "rb").read())
    data[len(data) // 2] ^= 1
    open(params_path, "wb").write(bytes(data))
    with pytest.raises(ClassifierError, match="checksum mismatch.*retrain=True"):
        classifier.get_domain_classifier("digits")


def test_stale_or_incomplete_cache_raises(digits_classifier, tmp_path, monkeypatch):
    params_path, meta_path = _copy_cache(digits_classifier, tmp_path, monkeypatch)
    meta = json.load(open(meta_path))
    json.dump(dict(meta, recipe_sha256="0" * 64), open(meta_path, "w"))
    with pytest.raises(ClassifierError, match="another digits-cnn-v1 recipe"):
        classifier.get_domain_classifier("digits")
    os.remove(meta_path)
    with pytest.raises(ClassifierError, match="incomplete"):
        classifier.get_domain_classifier("digits")


def test_unknown_dataset_missing_data_and_bad_images(digits_classifier, tmp_path, monkeypatch):
    with pytest.raises(ClassifierError, match="no domain classifier for data set 'cifar10'"):
        classifier.get_domain_classifier("cifar10")
    with pytest.raises(ClassifierError, match="not divisible"):
        classifier.register_recipe(dataclasses.replace(TINY, dataset="odd", image_size=10))
    monkeypatch.delenv("RESEARCH_DATA_DIR", raising=False)
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError, match="RESEARCH_DATA_DIR"):
        classifier.get_domain_classifier("mnist")
    images, _ = _digits("test")
    with pytest.raises(ClassifierError, match="uint8"):
        digits_classifier.features(images.astype(np.float32))
    with pytest.raises(ClassifierError, match=r"\[N, 8, 8, 1\]"):
        digits_classifier.features(images[..., 0])


def test_batching_and_padding_do_not_change_outputs(digits_classifier):
    train, _ = _digits("train")  # 1500 images: three batches, the last one padded
    features, probs = digits_classifier.features_and_probs(train, progress=False)
    assert features.shape == (1500, 128) and features.dtype == np.float64
    assert probs.shape == (1500, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(digits_classifier.features(train[1003:1010]), features[1003:1010])
    assert digits_classifier.features(train[:0]).shape == (0, 128)


# ----------------------------------------------------------------------------------------------- metrics


def _blur(images):
    """3x3 box blur of uint8 [N, H, W, 1], edges replicated."""
    x = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    out = sum(x[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return np.round(out).astype(np.uint8)


def test_domain_fid_separates_real_from_degraded_images(digits_classifier):
    train, _ = _digits("train")
    test, _ = _digits("test")
    noise = np.random.default_rng(0).integers(0, 256, size=test.shape, dtype=np.uint8)
    train_stats = fid.feature_statistics(digits_classifier.features(train))

    def to_train(images, method="sqrtm"):
        return fid.frechet_distance(
            *fid.feature_statistics(digits_classifier.features(images)), *train_stats, method=method
        )

    real, blurred, noisy = to_train(test), to_train(_blur(test)), to_train(noise)
    print(f"domain FID to digits train: test {real:.2f}, blurred test {blurred:.2f}, noise {noisy:.2f}")
    assert 0 < real < 0.1 * min(blurred, noisy)
    assert classifier.domain_fid(digits_classifier, test, train, progress=False) == real
    # The eigenvalue formulation agrees on these well-conditioned statistics.
    assert to_train(test, method="eigh") == pytest.approx(real, rel=1e-6)


def test_classifier_score_on_real_digits(digits_classifier):
    test, labels = _digits("test")
    score = classifier.classifier_score(digits_classifier.probs(test))
    # Confident, nearly balanced predictions: close to the number of classes.
    assert 8 < score <= 10


def test_classifier_score_closed_forms():
    k = 10
    assert classifier.classifier_score(np.full((7, k), 1 / k)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(k)[np.arange(5 * k) % k]
    assert classifier.classifier_score(one_hot) == pytest.approx(k, rel=1e-12)
    # Two classes, rows (p, 1-p) and (1-p, p) equally often: p(y) is uniform, KL = log 2 - H(p).
    p = 0.8
    probs = np.array([[p, 1 - p], [1 - p, p]] * 3)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert classifier.classifier_score(probs) == pytest.approx(2 * np.exp(-entropy), rel=1e-12)
    with pytest.raises(ValueError, match="not logits"):
        classifier.classifier_score(np.array([[2.0, -1.0]]))


def test_classifier_accuracy_closed_form():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    assert classifier.classifier_accuracy(probs, [0, 1, 2, 1]) == 0.75
    assert classifier.classifier_accuracy(probs, [0, 1, 2, 0]) == 1.0
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        classifier.classifier_accuracy(probs, [0, 1])


# ----------------------------------------------------------------------------------------------- full data sets


@pytest.mark.slow
# Measured: 0.9919 and 0.9168; the margins allow for another CPU training slightly different weights.
@pytest.mark.parametrize("name, min_accuracy", [("mnist", 0.988), ("fashion_mnist", 0.905)])
def test_full_classifier_accuracy(name, min_accuracy, tmp_path, monkeypatch):
    # Needs $RESEARCH_DATA_DIR/<name>/ (.ci/run sets it); without it the data layer raises DataError naming the fix.
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    clf = classifier.get_domain_classifier(name, progress=False)
    print(f"{clf.name}: test accuracy {clf.test_accuracy:.4f}, trained in {clf.metadata['train_seconds']} s")
    assert clf.test_accuracy >= min_accuracy
    test, labels = make_eval_arrays({"name": name, "image_size": 28}, "test")
    assert classifier.classifier_accuracy(clf.probs(test, progress=False), labels) == clf.test_accuracy
