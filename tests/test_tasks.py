"""Every registered task, through the one training loop: an interrupted run resumes exactly, and its step on 8
simulated devices equals the step on one. A task registered without a factory in tests/factories.py fails here."""

import json
import os

import jax
import numpy as np
import pytest

from research.config import ConfigError, apply_overrides
from research.tasks import Samples, Task, get_task, register_task, task_names
from research.train import mesh as mesh_lib
from research.train.loop import build_trainer, train
from tests.factories import make_tiny_resume_configs

CONFIGS = make_tiny_resume_configs()
FROZEN_FSDP = [("train.sharding_rules", "(('^frozen/', 'fsdp'),)"), ("train.fsdp_min_size", "64")]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"} for line in f]


def _assert_trees_equal(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_every_registered_task_has_a_factory():
    assert set(task_names()) <= set(CONFIGS), f"add tiny configs for {set(task_names()) - set(CONFIGS)}"


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_resume_is_exact(task, tmp_path):
    config, stop = CONFIGS[task]
    straight = train(config, str(tmp_path / "straight"))
    first = train(config, str(tmp_path / "resumed"), stop_at=stop)
    assert first["step"] == stop
    resumed = train(config, str(tmp_path / "resumed"))
    assert resumed["step"] == straight["step"] == config.train.num_steps
    # The same programs on the same inputs: bitwise equal, not merely close (losses, every part, optimizer, extra).
    assert _rows(tmp_path / "straight") == _rows(tmp_path / "resumed")
    _assert_trees_equal(jax.device_get(straight["state"]), jax.device_get(resumed["state"]), rtol=0, atol=0)
    history = json.load(open(tmp_path / "resumed" / "run_info.json"))["history"]
    assert [h["resumed_from_step"] for h in history] == [None, stop]


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_eight_device_step_equals_one_device_step(task):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    config, _ = CONFIGS[task]
    from research.data import make_train_iterator

    one = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    # Frozen parts (the ControlNet's base, a frozen text encoder, a teacher) sharded by rule over the 8 devices.
    sharded = apply_overrides(config, FROZEN_FSDP)
    many = build_trainer(sharded, mesh_lib.make_mesh(1))
    if task == "controlnet":
        base_sh = mesh_lib.frozen_shardings(many.mesh, "base", many.context["base_params"], sharded.train)
        assert any("data" in s.spec for s in jax.tree.leaves(base_sh))
    it = make_train_iterator(config.data, global_batch_size=config.train.batch_size, seed=0)
    batches = [next(it) for _ in range(2)]
    states, losses = [], []
    for trainer in (one, many):
        state = trainer.init(jax.random.PRNGKey(0))
        for b in batches:
            state, metrics = trainer.step(state, mesh_lib.global_batch(b, trainer.batch_sharding))
            losses.append(float(metrics["loss"]))
        states.append(jax.device_get(state))
    assert all(len(s.mesh.devices.flat) == 8 for s in jax.tree.leaves(many.state_sharding))
    np.testing.assert_allclose(losses[:2], losses[2:], rtol=1e-5)
    # atol: a parameter whose gradient is zero analytically (an attention key bias) gets Adam steps of +-lr driven
    # by round-off, whose sign differs between the two programs; everything else agrees to rtol.
    _assert_trees_equal(states[0].ema_params, states[1].ema_params, rtol=1e-4, atol=5e-5)
    # training moved the parameters, so the comparison is not between two copies of the initialisation
    init = jax.device_get(one.init(jax.random.PRNGKey(0)).params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), init, states[0].params))
    assert max(moved) > 1e-5


def test_adding_a_task_is_adding_a_registered_class(tmp_path):
    """A task registered from outside the package is found by name, validated, and refused by the sample command
    with its own message when it has no sampler."""
    from research.sample import main as sample_main

    @register_task("unit_test_task")
    class UnitTestTask(Task):
        def build_trainer(self, config, mesh):  # the one hook a task must write (Task is abstract)
            return get_task("diffusion").build_trainer(config, mesh)

        def validate(self, config):
            if config.train.num_steps > 99:
                raise ConfigError("unit_test_task trains at most 99 steps")

    try:
        task = get_task("unit_test_task")
        assert isinstance(task, UnitTestTask) and "unit_test_task" in task_names()
        from research.tasks import validate_config

        config = apply_overrides(CONFIGS["diffusion"][0], [("task", "unit_test_task")])
        with pytest.raises(ConfigError, match="at most 99 steps"):
            validate_config(apply_overrides(config, [("train.num_steps", "100")]))
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "config.json").write_text(config.to_json_best_effort())
        assert sample_main(["--workdir", str(workdir), "--num", "2"]) == 2
    finally:
        from research import tasks

        tasks._TASKS.pop("unit_test_task", None)
    with pytest.raises(ConfigError, match="task='nope' is not valid; choose one of"):
        get_task("nope")
    assert Samples.__dataclass_fields__.keys() >= {"images", "labels", "nfe"}
