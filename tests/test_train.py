"""Training: exact resume, sharded == single device, divergence handling, clear errors before compiling."""

import json
import os

import jax
import numpy as np
import pytest

from research.config import ConfigError, apply_overrides
from research.data import DataError, make_train_iterator
from research.tasks import validate_config
from research.train import mesh as mesh_lib
from research.train.checkpoint import CheckpointMismatchError
from research.train.loop import TrainingDiverged, build_trainer, train


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _assert_trees_equal(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    train(tiny_config, workdir, stop_at=3)
    bad = apply_overrides(tiny_config, [("optim.lr", "1e30"), ("optim.grad_clip", "0"), ("train.num_steps", "12")])
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 3\)"):
        train(bad, workdir)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [3]


def test_checkpoint_from_other_model_is_refused(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    train(tiny_config, workdir, stop_at=3)
    files = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "run_info.json")}
    wider = apply_overrides(tiny_config, [("model.ch", "32")])
    with pytest.raises(CheckpointMismatchError, match=r"different model.*model\.ch: checkpoint 16 vs config 32"):
        train(wider, workdir)
    # The refused command changed nothing in the run: its config and history are those of the run.
    assert {name: open(os.path.join(workdir, name)).read() for name in files} == files


def _no_compile(monkeypatch):
    """Make any attempt to build the model or its programs fail loudly: errors must come first."""
    import research.train.loop as loop

    def boom(*a, **k):
        raise AssertionError("compilation started before the input was validated")

    monkeypatch.setattr(loop, "build_trainer", boom)


def test_bad_input_fails_before_compilation(tiny_config, tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'model\.chanels' \(did you mean 'model\.channels'|"
        r"unknown config key 'model\.chanels'",
    ):
        apply_overrides(tiny_config, [("model.chanels", "3")])
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        apply_overrides(tiny_config, [("optim.lrr", "3")])

    odd = apply_overrides(
        tiny_config, [("data.name", "mnist"), ("data.image_size", "28"), ("model.ch_mult", "(1,2,2,2)")]
    )
    with pytest.raises(ConfigError, match=r"cannot be downsampled 3 times.*divisible by 8"):
        train(odd, str(tmp_path / "a"))

    missing = apply_overrides(
        tiny_config, [("data.name", "mnist"), ("data.image_size", "28"), ("data.data_dir", str(tmp_path / "nowhere"))]
    )
    with pytest.raises(DataError, match="nowhere"):
        train(missing, str(tmp_path / "b"))

    wrong_size = apply_overrides(tiny_config, [("data.image_size", "16")])
    with pytest.raises((ConfigError, DataError), match="image_size"):
        train(wrong_size, str(tmp_path / "c"))

    with pytest.raises(ConfigError, match=r"diffusion.prediction='epsilon' is not valid"):
        validate_config(apply_overrides(tiny_config, [("diffusion.prediction", "epsilon")]))
    with pytest.raises(ConfigError, match="batch_size=12 is not divisible by the 8"):
        train(
            apply_overrides(tiny_config, [("train.batch_size", "12"), ("train.num_devices", "0")]), str(tmp_path / "d")
        )
    assert not os.path.exists(tmp_path / "a" / "checkpoints")


def test_learned_variance_vlb_with_importance_sampling_resumes_exactly(tiny_config, tmp_path):
    cfg = apply_overrides(
        tiny_config,
        [
            ("diffusion.var_type", "learned_range"),
            ("diffusion.loss", "vlb"),
            ("diffusion.t_sampling", "importance"),
            ("train.num_steps", "4"),
            ("train.ckpt_every", "2"),
        ],
    )
    straight = train(cfg, str(tmp_path / "a"))
    train(cfg, str(tmp_path / "b"), stop_at=2)
    resumed = train(cfg, str(tmp_path / "b"))
    np.testing.assert_array_equal(_losses(tmp_path / "a")[1], _losses(tmp_path / "b")[1])
    # The loss-history buffer is part of the checkpoint: 4 steps x 16 examples were recorded.
    assert int(np.minimum(np.asarray(resumed["state"].extra.counts), 10).sum()) == 64
    _assert_trees_equal(straight["state"].extra, resumed["state"].extra, rtol=0, atol=0)
    assert straight["state"].params["net"]["conv_out"]["kernel"].shape[-1] == 2  # mean and variance channels


def test_hybrid_step_reports_both_terms(tiny_config):
    cfg = apply_overrides(tiny_config, [("diffusion.var_type", "learned_range"), ("diffusion.loss", "hybrid")])
    trainer = build_trainer(cfg, mesh_lib.make_mesh(1, jax.devices()[:1]))
    batch = next(make_train_iterator(cfg.data, global_batch_size=16, seed=0))
    state, metrics = trainer.step(
        trainer.init(jax.random.PRNGKey(0)), mesh_lib.global_batch(batch, trainer.batch_sharding)
    )
    m = jax.device_get(metrics)
    # L_hybrid = L_simple + 0.001 * T * L_t, with L_t logged per step in bits/dim.
    np.testing.assert_allclose(m["loss"], m["loss_simple"] + 0.001 * 100 * m["vlb_bpd_per_step"], rtol=1e-5)
    assert m["vlb_bpd_per_step"] > 0


def _events(directory):
    """Every event in a folder of TensorBoard event files, read as TFRecords (length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
    return events


def test_tensorboard_events_hold_the_logged_scalars_and_sample_grids(tiny_config, tmp_path):
    """Every logged scalar of metrics.jsonl is in the event files at its step; each preview grid is an image of the
    PNG's size."""
    from PIL import Image

    workdir = str(tmp_path / "run")
    config = apply_overrides(tiny_config, [("train.sample_every", "3")])
    train(config, workdir)
    scalars, images = {}, {}
    for e in _events(os.path.join(workdir, "tensorboard")):
        for v in e.summary.value:
            if v.HasField("image"):
                images[e.step] = (v.image.height, v.image.width)
            elif v.HasField("simple_value") or v.HasField("tensor"):
                value = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
                scalars[(v.tag, e.step)] = value
    steps, losses = _losses(workdir)
    assert steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([scalars[("train/loss", s)] for s in steps], losses, rtol=1e-6)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        keys = {k for row in map(json.loads, f) for k in row if k != "step"}
    assert {t[len("train/") :] for t, _ in scalars} == keys
    for step in (3, 6):
        with Image.open(os.path.join(workdir, "samples", f"step_{step:07d}.png")) as im:
            assert images[step] == (im.height, im.width)


def test_periodic_domain_fid_is_the_fid_of_the_saved_checkpoint(tiny_config, tmp_path):
    """train.fid_every writes fid.jsonl rows at those steps equal to an evaluation of the same checkpoint afterwards
    (the sweep runner's evaluator, same sampler settings and seed), and the values go to TensorBoard."""
    from experiments.sweep import EVAL_DEFAULTS, eval_fid_domain

    workdir = str(tmp_path / "run")
    config = apply_overrides(
        tiny_config, [("train.fid_every", "3"), ("train.fid_num", "48"), ("train.ema_decay", "0.0")]
    )
    train(config, workdir)
    with open(os.path.join(workdir, "fid.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [3, 6]
    options = dict(EVAL_DEFAULTS, num=48, batch=int(config.sample.batch_size))
    for r in rows:
        again = eval_fid_domain(workdir, options, 0, r["step"])
        assert r["fid_domain"] == pytest.approx(again["fid_domain"], rel=1e-6)
    assert rows[0]["fid_domain"] != rows[1]["fid_domain"]  # two different checkpoints
    board = {
        (v.tag, e.step): v.simple_value
        for e in _events(os.path.join(workdir, "tensorboard"))
        for v in e.summary.value
        if v.tag == "eval/fid_domain"
    }
    assert board == {("eval/fid_domain", r["step"]): pytest.approx(r["fid_domain"]) for r in rows}


@pytest.mark.parametrize(
    "overrides, words",
    [
        ([("train.fid_every", "4")], "multiple of train.ckpt_every"),
        ([("train.fid_every", "3"), ("data.name", "synthetic")], "no domain classifier"),
    ],
)
def test_periodic_fid_requests_fail_before_training(tiny_config, tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        train(apply_overrides(tiny_config, overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_periodic_fid_needs_a_sampler(tmp_path):
    from tests.factories import make_tiny_vae_config

    config = apply_overrides(make_tiny_vae_config(), [("train.fid_every", "4"), ("train.ckpt_every", "4")])
    with pytest.raises(ConfigError, match="no sampler"):
        train(config, str(tmp_path / "run"))
