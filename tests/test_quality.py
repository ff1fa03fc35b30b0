"""Quality (slow): the quickstart's trained model draws digits that a classifier trained on real digits
recognises about as often as it recognises real held-out digits."""

import os

import numpy as np
import pytest

from research.data import make_eval_arrays
from research.sampling import Generator, to_uint8
from research.tasks import get_config
from research.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digit_classifier(config):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_eval_arrays(config.data, "train")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(x.reshape(len(x), -1) / 255.0, y)
    return clf


def _recognised(clf, images, threshold=0.9):
    probs = clf.predict_proba(images.reshape(len(images), -1) / 255.0)
    return probs.max(axis=1) >= threshold, probs.argmax(axis=1)


@pytest.mark.slow
def test_quickstart_samples_are_recognised_as_digits(tmp_path):
    config = get_config(
        os.path.join(ROOT, "configs/quickstart.py"), [("train.sample_every", "0"), ("train.progress", "false")]
    )
    result = train(config, str(tmp_path / "run"))
    generator = Generator(result_model(config), config, batch_size=500)
    samples, _, nfe = generator.generate(result["state"].ema_params["net"], 500, seed=123, progress=False)
    images = to_uint8(samples, config.data.centered)
    assert nfe == 50

    clf = _digit_classifier(config)
    real, _ = make_eval_arrays(config.data, "test")
    real_ok, _ = _recognised(clf, real)
    fake_ok, fake_class = _recognised(clf, images)
    print(
        f"confidently recognised: real {real_ok.mean():.3f}, samples {fake_ok.mean():.3f}; "
        f"class histogram {np.bincount(fake_class, minlength=10).tolist()}"
    )
    # Close to real data: at least 85% of the real rate.
    assert fake_ok.mean() >= 0.85 * real_ok.mean()
    # Not a single mode: every digit class appears.
    assert np.bincount(fake_class, minlength=10).min() >= 0.02 * len(images)
    # And not the training images played back: no sample is a pixel copy of a training digit.
    train_x, _ = make_eval_arrays(config.data, "train")
    d = (
        np.abs(
            images.reshape(len(images), 1, -1).astype(np.int16) - train_x.reshape(1, len(train_x), -1).astype(np.int16)
        )
        .mean(-1)
        .min(1)
    )
    assert (d > 2).mean() > 0.95


def result_model(config):
    from research.shapes import build_network

    return build_network(config)
