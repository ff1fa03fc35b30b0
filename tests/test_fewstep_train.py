"""task='fewstep': progressive distillation, consistency distillation and consistency training wired into the
trainer (research/tasks/fewstep.py). The math itself is tested in test_fewstep.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.factories import make_tiny_config


def _teacher_config():
    c = make_tiny_config()
    # smaller than the shared tiny U-Net: one level, no attention, so each distillation step compiles in seconds
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions, c.model.norm_groups = 8, (1,), (), 4
    c.model.dropout = 0.0
    c.diffusion.prediction = "v"
    return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny 'trained' teacher: random U-Net weights (the zero-initialised output layers perturbed, so the
    network is not the zero function), saved as a diffusion run's checkpoint at step 7."""
    from research.train.checkpoint import Checkpointer
    from research.train.loop import build_trainer

    config = _teacher_config()
    workdir = str(tmp_path_factory.mktemp("teacher"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(1))
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, noisy)
    state = state.replace(params=params, ema_params=params, step=jnp.asarray(7, jnp.int32))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), None)
    ckpt.save(7, state, {}, trainer.meta)
    ckpt.wait()
    ckpt.close()
    return workdir, jax.device_get(params["net"])


def fewstep_config(method, teacher_dir, **fields):
    c = _teacher_config()
    c.task = "fewstep"
    c.fewstep.method = method
    c.fewstep.teacher_workdir = teacher_dir if method in ("pd", "cd") else ""
    c.fewstep.pd_start_steps = 4
    c.fewstep.pd_steps_per_round = 2
    c.train.num_steps = 4
    c.train.ckpt_every = 2
    c.train.keep_checkpoints = 2
    c.train.ema_decay = 0.5
    c.optim.warmup_steps = 0  # the first update moves the student (linear warmup starts at rate 0)
    c.fewstep.num_points = 6
    c.fewstep.s0, c.fewstep.s1 = 2, 8
    for key, value in fields.items():
        c.fewstep[key] = value
    return c


def _batch(trainer, seed=0, n=16):
    from research.train import mesh as mesh_lib

    x = jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 1), minval=-1.0, maxval=1.0)
    return mesh_lib.global_batch({"image": np.asarray(x)}, trainer.batch_sharding)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["pd", "cd"])
def test_student_starts_as_the_teacher(teacher_dir, method):
    from research.train.loop import build_trainer

    workdir, teacher = teacher_dir
    trainer = build_trainer(fewstep_config(method, workdir))
    state = _host(trainer.init(jax.random.PRNGKey(0)))
    _assert_trees_equal(state.params["net"], teacher)
    _assert_trees_equal(state.ema_params["net"], teacher)
    # PD's round teacher is trained state; CD's teacher is a frozen part, referenced (not copied) by checkpoints.
    held = state.extra["teacher"] if method == "pd" else trainer.context["frozen"]["teacher"]
    _assert_trees_equal(held, teacher)
    assert ("teacher" in state.extra) == (method == "pd") and ("target" in state.extra) == (method == "cd")
    if method == "cd":
        ref = trainer.meta["frozen"]["teacher"]
        assert ref["workdir"] == os.path.abspath(workdir) and ref["step"] == 7 and len(ref["sha256"]) == 64
    if method == "cd":
        _assert_trees_equal(state.extra["target"], teacher)
    assert int(state.step) == 0


def test_pd_loss_at_init_matches_two_teacher_ddim_steps(teacher_dir):
    """Student = teacher, round 0 (4 -> 2 steps): the loss equals the paper's Algorithm 2 target assembled by hand
    from two explicit DDIM steps of the teacher, in the v-parameterisation with weight max(abar, 1 - abar)."""
    from research.diffusion.distillation import pd_schedules
    from research.sampling import schedule_from_config
    from research.train.loop import build_trainer

    workdir, teacher = teacher_dir
    config = fewstep_config("pd", workdir)
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    batch = _batch(trainer)
    x0 = np.asarray(batch["image"], np.float64)
    _, metrics = trainer.step(state, batch)

    tsched, _ = pd_schedules(schedule_from_config(config.diffusion), 4, 0)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    j_key, noise_key, _ = jax.random.split(rng, 3)
    j = np.asarray(jax.random.randint(j_key, (16,), 0, 2))
    noise = np.asarray(jax.random.normal(noise_key, x0.shape, jnp.float32), np.float64)
    abar = tsched.alphas_cumprod
    net = lambda x, i: np.asarray(
        trainer.model.apply(  # noqa: E731
            {"params": teacher},
            jnp.asarray(x, jnp.float32),
            jnp.asarray(tsched.timesteps[i], jnp.int32),
            None,
            train=False,
        ),
        np.float64,
    )
    col = lambda a: a[:, None, None, None]  # noqa: E731
    i = 2 * j + 1
    a, s = np.sqrt(abar[i]), np.sqrt(1 - abar[i])
    z = col(a) * x0 + col(s) * noise
    v = net(z, i)
    x0_1 = col(a) * z - col(s) * v
    eps_1 = col(s) * z + col(a) * v
    a1, s1 = np.sqrt(abar[i - 1]), np.sqrt(1 - abar[i - 1])
    z1 = col(a1) * x0_1 + col(s1) * eps_1  # DDIM (eta = 0) to the teacher's midpoint
    v1 = net(z1, i - 1)
    x0_2 = col(a1) * z1 - col(s1) * v1
    eps_2 = col(s1) * z1 + col(a1) * v1
    ab2 = np.where(j == 0, 1.0, abar[np.maximum(i - 2, 0)])
    a2, s2 = np.sqrt(ab2), np.sqrt(1 - ab2)
    z2 = col(a2) * x0_2 + col(s2) * eps_2
    ratio = col(s2 / s)
    x0_target = (z2 - ratio * z) / (col(a2) - ratio * col(a))  # Salimans & Ho, Algorithm 2
    eps_target = (z - col(a) * x0_target) / col(s)
    v_target = col(a) * eps_target - col(s) * x0_target
    weight = np.maximum(abar[i], 1 - abar[i])  # max(SNR, 1) / (SNR + 1) for a v-student
    expected = np.mean(weight * np.mean((v - v_target) ** 2, axis=(1, 2, 3)))
    assert expected > 1e-4  # two teacher steps differ from one: the loss is not trivially zero
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-3)
    assert float(metrics["student_steps"]) == 2.0


def test_pd_round_boundary_swaps_teacher_and_halves_steps(teacher_dir):
    from research.train.loop import build_trainer

    workdir, teacher = teacher_dir
    config = fewstep_config("pd", workdir, pd_steps_per_round=1)
    config.train.num_steps, config.train.ckpt_every = 2, 1
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    state, m0 = trainer.step(state, _batch(trainer, 0))
    after_round0 = _host(state)
    assert float(m0["student_steps"]) == 2.0
    state, m1 = trainer.step(state, _batch(trainer, 1))
    state = _host(state)
    assert float(m1["student_steps"]) == 1.0 and float(m1["round"]) == 1.0
    # the round-1 teacher is the round-0 student's EMA (sample.use_ema), not the original teacher
    _assert_trees_equal(state.extra["teacher"], after_round0.ema_params["net"])
    changed = [
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(jax.tree.leaves(after_round0.ema_params["net"]), jax.tree.leaves(teacher))
    ]
    assert any(changed)
    # Adam restarted: its step count is 1 (one update in round 1), not 2
    counts = [np.asarray(x) for x in jax.tree.leaves(state.opt_state) if np.asarray(x).dtype == np.int32]
    assert counts and all(int(c) == 1 for c in counts)


@pytest.mark.slow
def test_pd_resume_is_exact_and_keeps_every_round(teacher_dir, tmp_path):
    """2 + 2 steps (stopping exactly at the round boundary) equal 4 uninterrupted steps bit for bit; both rounds'
    checkpoints are kept and labelled with the student's step count."""
    from research.tasks.fewstep import load_student, round_table
    from research.train.checkpoint import Checkpointer
    from research.train.loop import train

    workdir, _ = teacher_dir
    config = fewstep_config("pd", workdir)
    full = train(config, str(tmp_path / "full"))["state"]
    train(config, str(tmp_path / "split"), stop_at=2)
    resumed = train(config, str(tmp_path / "split"))["state"]
    _assert_trees_equal(_host(full), _host(resumed))
    ckpt = Checkpointer(str(tmp_path / "split" / "checkpoints"), None)
    assert sorted(ckpt.all_steps()) == [2, 4]
    meta = ckpt.read_meta(2)
    ckpt.close()
    assert [(r["student_steps"], r["checkpoint_step"]) for r in meta["fewstep"]["rounds"]] == [(2, 2), (1, 4)]
    assert meta["fewstep"]["rounds"] == round_table(config)
    _, _, params2, step2 = load_student(str(tmp_path / "split"), steps=2)
    assert step2 == 2
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["student_steps"] for r in rows] == [2, 2, 1, 1]


@pytest.mark.parametrize("method,curriculum", [("cd", "cm"), pytest.param("ct", "cm", marks=pytest.mark.slow)])
def test_target_network_follows_the_mu_schedule(teacher_dir, method, curriculum):
    """theta^- <- mu(k) theta^- + (1 - mu(k)) theta after each update: fixed mu for CD, CM's mu(k) for CT."""
    from research.diffusion.consistency import cm_ema_decay, cm_num_points
    from research.train.loop import build_trainer

    workdir, _ = teacher_dir
    config = fewstep_config(method, workdir, curriculum=curriculum, target_ema=0.7)
    config.train.num_steps = 3
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    target = _host(state.extra["target"])
    for k in range(3):
        state, metrics = trainer.step(state, _batch(trainer, k))
        mu = 0.7 if method == "cd" else cm_ema_decay(k, 3, s0=2, s1=8, mu0=0.9)
        n = 6 if method == "cd" else cm_num_points(k, 3, s0=2, s1=8)
        assert float(metrics["target_ema"]) == np.float32(mu) and float(metrics["num_points"]) == n
        params = _host(state.params["net"])
        m = np.float32(mu)
        target = jax.tree.map(lambda t, p: m * t + (np.float32(1) - m) * p, target, params)
        for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(_host(state.extra["target"]))):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert len({float(cm_ema_decay(k, 3, s0=2, s1=8, mu0=0.9)) for k in range(3)}) > 1 or method == "cd"


def test_ict_has_no_target_network_and_uses_the_student_as_target(teacher_dir):
    """iCT: no EMA target arrays; the loss equals ct_loss with target = stop_gradient(student), with lognormal
    pair indices over the ict_num_points(k) grid and pseudo-Huber distance."""
    from research.diffusion import consistency as cm
    from research.sampling import schedule_from_config
    from research.tasks.fewstep import consistency_grid, student_consistency_fn
    from research.train.loop import build_trainer

    config = fewstep_config(
        "ct", "", curriculum="ict", distance="pseudo_huber", weighting="ict", index_distribution="lognormal"
    )
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    assert state.extra is None
    params = _host(state.params["net"])
    batch = _batch(trainer)
    _, metrics = trainer.step(state, batch)
    n_points = cm.ict_num_points(0, 4, s0=2, s1=8)
    assert float(metrics["num_points"]) == n_points and float(metrics["target_ema"]) == 0.0

    grid = consistency_grid(config, schedule_from_config(config.diffusion))
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    idx_key, noise_key, _ = jax.random.split(rng, 3)
    x0 = jnp.asarray(batch["image"])
    n = cm.sample_pair_index(idx_key, (16,), n_points, distribution="lognormal", max_points=9, **grid)
    sigma, sigma_next = cm.pair_sigmas(n, n_points, **grid)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    f = student_consistency_fn(config, trainer.model, None, params, grid)
    expected = jnp.mean(cm.ct_loss(f, f, x0, noise, sigma, sigma_next, distance="pseudo_huber", weighting="ict"))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


def test_consistency_students_satisfy_the_boundary_condition(teacher_dir):
    from research.sampling import schedule_from_config
    from research.tasks.fewstep import consistency_grid, student_consistency_fn
    from research.train.loop import build_trainer

    workdir, teacher = teacher_dir
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
    for method in ("cd", "ct"):
        config = fewstep_config(method, workdir)
        schedule = schedule_from_config(config.diffusion)
        grid = consistency_grid(config, schedule)
        model = build_trainer(config).model
        f = student_consistency_fn(config, model, schedule, teacher, grid)
        np.testing.assert_array_equal(np.asarray(f(x, jnp.full((4,), grid["sigma_min"]))), np.asarray(x))
        assert np.max(np.abs(np.asarray(f(x, jnp.full((4,), 1.0))) - np.asarray(x))) > 1e-3
    # cd clips the configured [0.002, 80] to the teacher schedule's own sigma range
    assert consistency_grid(fewstep_config("cd", workdir), schedule)["sigma_min"] > 0.002


@pytest.mark.parametrize("method", ["pd", "cd"])
def test_student_sampler_spends_one_evaluation_per_step(teacher_dir, method):
    from research.tasks.fewstep import generate, make_student_sampler
    from research.train.loop import build_trainer

    workdir, teacher = teacher_dir
    config = fewstep_config(method, workdir)
    model = build_trainer(config).model
    for steps in (1, 2):
        samples, _, nfe = generate(make_student_sampler(config, model, steps, 4), teacher, 4, 4)
        assert nfe == steps and samples.shape == (4, 8, 8, 1) and np.all(np.isfinite(samples))
    # Chosen noise levels (experiments/cm_sigma_search.py): the default levels given explicitly are the default
    # sampler; another intermediate level changes the samples; a wrong count, or a pd student, is refused.
    from research.config import ConfigError
    from research.sampling import schedule_from_config
    from research.tasks.fewstep import consistency_grid, consistency_sample_sigmas

    if method == "pd":
        with pytest.raises(ConfigError, match="only consistency models"):
            make_student_sampler(config, model, 2, 4, sigmas=np.array([80.0, 1.0]))
        return
    grid = consistency_grid(config, schedule_from_config(config.diffusion))
    default = consistency_sample_sigmas(2, grid)
    given = generate(make_student_sampler(config, model, 2, 4, sigmas=default), teacher, 4, 4)[0]
    np.testing.assert_array_equal(given, samples)
    other = generate(make_student_sampler(config, model, 2, 4, sigmas=[default[0], default[1] / 4]), teacher, 4, 4)[0]
    assert np.max(np.abs(other - samples)) > 1e-3
    with pytest.raises(ConfigError, match="2 steps need 2 noise levels"):
        make_student_sampler(config, model, 2, 4, sigmas=default[:1])


def test_sample_command_takes_a_consistency_runs_noise_levels(teacher_dir, tmp_path, capsys):
    """research.sample --sigmas: the default levels given explicitly draw the default samples, a searched level
    other samples (the same as make_student_sampler on those levels); bad levels, and levels for a run that is not a
    consistency model, are refused with exit code 2 and the reason."""
    from research.sample import main as sample_main
    from research.sampling import schedule_from_config, to_uint8
    from research.tasks.fewstep import (
        consistency_grid,
        consistency_sample_sigmas,
        generate,
        load_student,
        make_student_sampler,
    )
    from research.train.loop import train

    teacher, _ = teacher_dir
    run, out = str(tmp_path / "cd"), str(tmp_path / "out")
    config = fewstep_config("cd", teacher)
    train(config, run, stop_at=2)
    grid = consistency_grid(config, schedule_from_config(config.diffusion))
    lo, hi = grid["sigma_min"], grid["sigma_max"]
    default = consistency_sample_sigmas(2, grid)

    def draw(*args):
        assert sample_main(["--workdir", run, "--num", "4", "--out", out, *args]) == 0

    def images(name):
        with np.load(os.path.join(out, name + ".npz")) as f:
            return f["images"], int(f["nfe"])

    draw("--steps", "2")
    draw("--sigmas", ",".join(repr(float(s)) for s in default))
    plain, nfe = images("samples_cd_2steps_seed0")
    given_name = "samples_cd_2steps_sigmas" + "-".join(f"{s:g}" for s in default) + "_seed0"
    np.testing.assert_array_equal(images(given_name)[0], plain)
    assert nfe == 2
    level = float(np.sqrt(lo * default[1]))  # between sigma_min and the default intermediate level
    draw("--sigmas", f"{hi!r},{level!r}")
    chosen, nfe = images(f"samples_cd_2steps_sigmas{hi:g}-{level:g}_seed0")
    assert nfe == 2 and np.mean(chosen != plain) > 0.05
    _, model, params, _ = load_student(run)
    direct = generate(make_student_sampler(config, model, 2, 4, sigmas=[hi, level]), params, 4, 4)[0]
    np.testing.assert_array_equal(chosen, to_uint8(direct, config.data.centered))
    bad = [
        (["--sigmas", f"{level!r},{hi!r}"], "decrease strictly"),
        (["--sigmas", f"{hi * 2!r},{level!r}"], "must lie in (sigma_min, sigma_max]"),
        (["--sigmas", f"{hi!r},{lo!r}"], "must lie in (sigma_min, sigma_max]"),
        (["--sigmas", f"{hi!r},{level!r}", "--steps", "3"], "3 steps need 3 noise levels"),
    ]
    for args, words in bad:
        capsys.readouterr()
        assert sample_main(["--workdir", run, "--num", "2", "--out", out, *args]) == 2
        assert words in capsys.readouterr().err
    assert sample_main(["--workdir", teacher, "--num", "2", "--out", out, "--sigmas", "80,0.7"]) == 2
    assert "a consistency model's noise levels" in capsys.readouterr().err


def test_fewstep_config_errors_name_the_key(teacher_dir, tmp_path):
    from research.config import ConfigError
    from research.tasks import validate_config
    from research.train.loop import build_trainer

    workdir, _ = teacher_dir
    bad = [
        (dict(), "num_steps", lambda c: setattr(c.train, "num_steps", 5)),
        (dict(), "keep_checkpoints", lambda c: setattr(c.train, "keep_checkpoints", 1)),
        (dict(), "ckpt_every", lambda c: setattr(c.train, "ckpt_every", 3)),
        (dict(pd_start_steps=6), "power of two", lambda c: None),
        (dict(teacher_workdir=""), "teacher_workdir", lambda c: None),
        (dict(method="xx"), "fewstep.method", lambda c: None),
    ]
    for fields, words, edit in bad:
        c = fewstep_config("pd", workdir)
        for key, value in fields.items():
            c.fewstep[key] = value
        edit(c)
        with pytest.raises(ConfigError, match=words):
            validate_config(c)
    validate_config(fewstep_config("pd", workdir))
    mismatched = fewstep_config("cd", workdir)
    mismatched.diffusion.prediction = "eps"
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        build_trainer(mismatched).init(jax.random.PRNGKey(0))


def test_pd_config_suffixes_set_the_rounds_and_their_layout():
    """configs/pd_mnist.py:digits-s32-f4-r500 (the converged run of REPRODUCTION.md): 3 rounds 32 -> 4 steps of 500
    updates, every round's student checkpointed; bad suffixes are named."""
    from research.config import load_config_file
    from research.tasks import validate_config

    c = load_config_file("configs/pd_mnist.py:digits-s32-f4-r500")
    f = c.fewstep
    assert (f.pd_start_steps, f.pd_final_steps, f.pd_steps_per_round) == (32, 4, 500)
    assert (c.train.num_steps, c.train.ckpt_every, c.train.keep_checkpoints) == (1500, 500, 3)
    validate_config(c)
    plain = load_config_file("configs/pd_mnist.py:digits")
    assert (plain.fewstep.pd_start_steps, plain.fewstep.pd_final_steps, plain.train.num_steps) == (16, 1, 1000)
    for variant in ("digits-s32-s16", "digits-r0", "digits-x4", "pixels", "digits-r"):
        with pytest.raises(Exception, match=f"unknown variant '{variant}'"):
            load_config_file("configs/pd_mnist.py:" + variant)


def test_teacher_check_reads_an_older_run_and_ignores_remat():
    """A teacher whose config.json predates a U-Net key (here remat and null_label) has that key's default; remat
    (how the network is computed) may differ; an architectural difference is refused with the key named."""
    from research.config import ConfigError, config_from_dict, load_config_file
    from research.tasks.teacher import check_teacher_config

    student = load_config_file("configs/pd_mnist.py:digits")
    old = json.loads(student.to_json_best_effort())
    for key in ("remat", "null_label"):
        del old["model"][key]
    check_teacher_config(student, config_from_dict(old))
    student.model.remat = "full"
    check_teacher_config(student, config_from_dict(old))
    old["model"]["ch"] = 64
    with pytest.raises(ConfigError, match="model.ch: teacher 64 vs config 32"):
        check_teacher_config(student, config_from_dict(old))
    student.model.null_label = True
    old["model"]["ch"] = 32
    with pytest.raises(ConfigError, match="model.null_label: teacher False vs config True"):
        check_teacher_config(student, config_from_dict(old))
