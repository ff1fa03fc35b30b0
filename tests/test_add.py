"""Adversarial diffusion distillation (fewstep.method='add'): the math of research/diffusion/adversarial.py against
closed forms and finite differences, and the trainer of research/tasks/add.py on a tiny teacher."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import adversarial as adv
from research.diffusion import gaussian
from research.diffusion.schedules import make_schedule
from tests.factories import make_tiny_config


def test_student_timesteps_are_the_trailing_grid():
    np.testing.assert_array_equal(adv.add_timesteps(1000, 4), [999, 749, 499, 249])  # the paper's four
    np.testing.assert_array_equal(adv.add_timesteps(1000, 1), [999])
    np.testing.assert_array_equal(adv.sample_timesteps(1000, 4, 2), [999, 499])
    assert set(adv.sample_timesteps(1000, 4, 2)) <= set(adv.add_timesteps(1000, 4))
    with pytest.raises(ValueError, match="1..4 steps"):
        adv.sample_timesteps(1000, 4, 5)
    with pytest.raises(ValueError, match="1 <= k <= T"):
        adv.add_timesteps(10, 0)


def test_distillation_loss_value_weight_and_stop_gradient():
    """Per example c(t) mean((s - target)^2) with target = teacher(q_sample(s, t, noise)) for the t and noise the
    key draws; the gradient is 2 c(t) (s - target) / D (nothing flows through the teacher or its input)."""
    schedule = make_schedule("cosine", 50)
    key = jax.random.PRNGKey(3)
    student = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 2))

    def teacher(x_t, t, cond):  # nonlinear in its input, so a missing stop-gradient would change the gradient
        return jnp.tanh(1.5 * x_t) + 0.01 * t[:, None, None, None]

    for weighting in adv.WEIGHTINGS:
        loss, grad = jax.value_and_grad(
            lambda s, w=weighting: jnp.sum(adv.distillation_loss(schedule, teacher, s, key, weighting=w))
        )(student)
        t_key, noise_key = jax.random.split(key)
        t = np.asarray(jax.random.randint(t_key, (6,), 1, 50))
        noise = jax.random.normal(noise_key, student.shape)
        target = np.asarray(teacher(gaussian.q_sample(schedule, student, t, noise), jnp.asarray(t), None))
        abar = schedule.alphas_cumprod[t]
        c = {"alpha": np.sqrt(abar), "alpha_bar": abar, "uniform": np.ones(6)}[weighting]
        diff = np.asarray(student) - target
        want = c * np.mean(diff**2, axis=(1, 2, 3))
        np.testing.assert_allclose(loss, want.sum(), rtol=1e-5)
        np.testing.assert_allclose(grad, 2 * c[:, None, None, None] * diff / diff[0].size, rtol=1e-4, atol=1e-7)


def test_hinge_generator_and_accuracy_closed_forms():
    real = [jnp.array([[2.0, 0.5], [-1.0, 0.0]]), jnp.array([[0.3], [1.5]])]
    fake = [jnp.array([[-2.0, 0.5], [1.0, -0.2]]), jnp.array([[-0.3], [0.1]])]
    # head 0: real relu(1-x) = 0, .5, 2, 1 -> .875; fake relu(1+x) = 0, 1.5, 2, .8 -> 1.075
    # head 1: real .7, 0 -> .35; fake .7, 1.1 -> .9
    np.testing.assert_allclose(adv.hinge_discriminator_loss(real, fake), (0.875 + 0.35) / 2 + (1.075 + 0.9) / 2)
    np.testing.assert_allclose(adv.generator_adversarial_loss(fake), -((-0.7 / 4) + (-0.2 / 2)) / 2, rtol=1e-6)
    # real > 0: 2/4 and 2/2; fake < 0: 2/4 and 1/2
    np.testing.assert_allclose(adv.discriminator_accuracy(real, fake), 0.5 * ((0.5 + 1.0) / 2 + (0.5 + 0.5) / 2))
    np.testing.assert_allclose(adv.example_scores(real), [1.25 + 0.3, -0.5 + 1.5])


def test_r1_penalty_equals_finite_differences():
    """R1 of the real discriminator (heads on the digits classifier's convolution features) against central
    differences, in float64."""
    from research.metrics.classifier import SmallCNN
    from research.models.discriminator import DiscriminatorHeads, capture

    with jax.enable_x64(True):
        cnn = SmallCNN(widths=(4, 8), convs_per_stage=1, feature_dim=16, num_classes=10, dropout=0.0)
        x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1), jnp.float64, -1, 1)
        cnn_params = cnn.init(jax.random.PRNGKey(1), x)["params"]
        names = ("Conv_0", "Conv_1", "features")
        heads = DiscriminatorHeads(3, 8, num_classes=10)
        labels = jnp.array([1, 4, 7])
        feats = capture(cnn, {"params": cnn_params}, names, x)
        head_params = heads.init(jax.random.PRNGKey(2), feats, labels)["params"]
        head_params = jax.tree.map(lambda p: p + 0.3 * jnp.ones_like(p), head_params)  # make the projection count

        @jax.jit
        def score(z):
            out = heads.apply({"params": head_params}, capture(cnn, {"params": cnn_params}, names, z), labels)
            return adv.example_scores(out)

        r1 = float(jax.jit(lambda z: adv.r1_penalty(score, z))(x))
        eps, fd = 1e-6, np.zeros(x.shape)
        flat = np.asarray(x).reshape(3, -1)
        for d in range(flat.shape[1]):  # one coordinate in every example at once: examples are independent
            up, down = flat.copy(), flat.copy()
            up[:, d] += eps
            down[:, d] -= eps
            diff = np.asarray(score(jnp.asarray(up.reshape(x.shape)))) - np.asarray(
                score(jnp.asarray(down.reshape(x.shape)))
            )
            fd.reshape(3, -1)[:, d] = diff / (2 * eps)
        want = np.mean(np.sum(fd.reshape(3, -1) ** 2, axis=1))
        assert want > 1e-3
        np.testing.assert_allclose(r1, want, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_denoiser_gives_the_closed_form_variance(steps):
    """Data x0 ~ N(0, v): the exact x0 predictor is E[x0 | x_t] = sqrt(abar) v / (abar v + 1 - abar) x_t, and the
    k-step sampler's output variance follows from re-noising with fresh noise, step by step."""
    schedule = make_schedule("cosine", 1000)
    v = 0.25
    ab = schedule.alphas_cumprod

    def exact(x_t, t, cond):
        a = jnp.asarray(ab, jnp.float32)[t][:, None]
        return jnp.sqrt(a) * v / (a * v + 1 - a) * x_t

    timesteps = adv.sample_timesteps(1000, 4, steps)
    out = adv.add_sample(exact, schedule, timesteps, jax.random.PRNGKey(0), (20000, 16), clip=False)
    var_x = 1.0
    for i, t in enumerate(timesteps):
        k = np.sqrt(ab[t]) * v / (ab[t] * v + 1 - ab[t])
        var0 = k**2 * var_x
        if i + 1 < len(timesteps):
            nxt = ab[timesteps[i + 1]]
            var_x = nxt * var0 + 1 - nxt
    np.testing.assert_allclose(np.var(np.asarray(out)), var0, rtol=0.03)
    assert var0 < v  # the few-step posterior mean is under-dispersed, more so with fewer steps


# ------------------------------------------------------------------------------------------ the trainer


def _tiny(**fields):
    c = make_tiny_config()
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions, c.model.norm_groups = 8, (1,), (), 4
    c.model.dropout = 0.0
    c.diffusion.prediction = "v"
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny v-parameterised digits U-Net trained 30 steps (so its x0 predictions are not the zero image)."""
    from research.train.loop import train

    workdir = str(tmp_path_factory.mktemp("add") / "teacher")
    train(_tiny(train__num_steps=30, train__ckpt_every=30), workdir)
    return workdir


def _student(teacher, **fields):
    c = _tiny(**fields)
    c.task = "fewstep"
    c.fewstep.method = "add"
    c.fewstep.teacher_workdir = teacher
    c.add.feature_t = 10
    c.optim.warmup_steps = 0
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "d_accuracy" in r]


def test_adversarial_term_alone_trains_the_heads_and_keeps_frozen_parts(teacher, tmp_path):
    """lambda = 0, the student nearly still (rate 1e-5): the heads learn to tell real digits from the student's
    (accuracy leaves 0.5); the teacher and
    the feature network come out bit-identical, referenced by sha256 in the checkpoint; the student samples."""
    from research.latents import params_digest
    from research.metrics.classifier import get_domain_classifier
    from research.run import load_params, read_config, read_meta
    from research.sample import main as sample_main
    from research.train.loop import build_trainer, train

    config = _student(
        teacher, add__distill_weight=0.0, add__disc_lr=1e-3, optim__lr=1e-5, train__num_steps=40, train__ckpt_every=40
    )
    workdir = str(tmp_path / "adv")
    train(config, workdir)
    rows = _metrics(workdir)
    assert all(r["distill"] == 0.0 for r in rows)
    assert abs(rows[0]["d_accuracy"] - 0.5) < 0.2
    early, late = np.mean([r["d_accuracy"] for r in rows[:5]]), np.mean([r["d_accuracy"] for r in rows[-5:]])
    assert late > 0.65 and late > early + 0.15, [round(r["d_accuracy"], 3) for r in rows]

    _, teacher_params, _ = load_params(teacher)
    trainer = build_trainer(read_config(workdir))
    frozen = jax.device_get(trainer.context["frozen"])
    for a, b in zip(jax.tree.leaves(frozen["teacher"]), jax.tree.leaves(teacher_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    clf = get_domain_classifier("digits", progress=False)
    for a, b in zip(jax.tree.leaves(frozen["features"]), jax.tree.leaves(clf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = read_meta(workdir, 40)
    assert meta["frozen"]["teacher"]["sha256"] == params_digest(teacher_params)
    assert meta["frozen"]["features"]["sha256"] == params_digest(clf.params)

    assert sample_main(["--workdir", workdir, "--steps", "2", "--num", "4"]) == 0
    saved = np.load(os.path.join(workdir, "samples", "samples_add_2steps_seed0.npz"))
    assert saved["images"].shape == (4, 8, 8, 1) and int(saved["nfe"]) == 2
    assert sample_main(["--workdir", workdir, "--steps", "5", "--num", "4"]) == 2


def test_distillation_term_alone_pulls_the_student_to_the_teacher(teacher, tmp_path):
    """No adversarial term: the student's x0 moves toward the teacher's x0 of its re-noised output, measured on
    fixed digits, timesteps and noise before (student = teacher) and after 40 updates."""
    from research.data import make_eval_arrays, to_model_range
    from research.loader import load_run
    from research.run import load_params
    from research.sampling import schedule_from_config
    from research.tasks.add import student_x0_fn, teacher_x0_fn
    from research.train.loop import train

    config = _student(
        teacher,
        add__adversarial_weight=0.0,
        add__features="teacher",
        optim__lr=3e-3,
        train__num_steps=40,
        train__ckpt_every=40,
    )
    workdir = str(tmp_path / "distill")
    train(config, workdir)
    assert all(r["g_adv"] == 0.0 for r in _metrics(workdir))

    _, model, student_params, _ = load_run(workdir, use_ema=False)
    _, teacher_params, _ = load_params(teacher)
    schedule = schedule_from_config(config.diffusion)
    images, _ = make_eval_arrays(config.data, "train", 256)
    x0 = jnp.asarray(to_model_range(images))
    grid = jnp.asarray(adv.add_timesteps(schedule.num_steps, config.add.student_timesteps))
    s = grid[jax.random.randint(jax.random.PRNGKey(0), (256,), 0, grid.shape[0])]
    x_s = gaussian.q_sample(schedule, x0, s, jax.random.normal(jax.random.PRNGKey(1), x0.shape))
    teacher_x0 = teacher_x0_fn(config, model, teacher_params, schedule)

    def objective(params):
        fake = student_x0_fn(model, params, "v", schedule)(x_s, s, None)
        return float(jnp.mean(adv.distillation_loss(schedule, teacher_x0, fake, jax.random.PRNGKey(2))))

    before, after = objective(teacher_params), objective(student_params)
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("path", ["configs/add_digits.py", "configs/add_digits.py:teacher", "configs/add_mnist.py"])
def test_add_configs_are_the_paper_recipe_and_validate(path):
    from research.config import load_config_file
    from research.tasks import validate_config

    c = load_config_file(path)
    assert c.task == "fewstep" and c.fewstep.method == "add" and c.diffusion.prediction == "v"
    assert c.add.student_timesteps == 4 and c.add.distill_weight == 2.5 and c.add.weighting == "alpha"
    np.testing.assert_array_equal(adv.add_timesteps(c.diffusion.timesteps, 4), [999, 749, 499, 249])
    assert c.add.features == ("teacher" if path.endswith(":teacher") else "classifier")
    validate_config(c)
    bad = load_config_file(path)
    bad.fewstep.sample_steps = 5
    with pytest.raises(Exception, match="sample_steps=5"):
        validate_config(bad)


@pytest.mark.parametrize(
    "variant,features,distill,adversarial",
    [
        ("classifier-l0", "classifier", 0.0, 1.0),
        ("teacher-l5", "teacher", 5.0, 1.0),
        ("classifier-noadv", "classifier", 2.5, 0.0),
        ("classifier-l1-noadv", "classifier", 1.0, 0.0),
    ],
)
def test_add_digits_ablation_variants(variant, features, distill, adversarial):
    from research.config import load_config_file

    c = load_config_file("configs/add_digits.py:" + variant)
    assert (c.add.features, c.add.distill_weight, c.add.adversarial_weight) == (features, distill, adversarial)


@pytest.mark.parametrize("variant", ["pixels", "classifier-lx", "classifier-l-1", "classifier-linf", "teacher-l1-l2"])
def test_add_digits_unknown_variant_is_named(variant):
    from research.config import load_config_file

    with pytest.raises(Exception, match=f"unknown variant '{variant}'"):
        load_config_file("configs/add_digits.py:" + variant)
