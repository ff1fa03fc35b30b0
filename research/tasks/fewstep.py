"""Few-step generation as a training task (task='fewstep'): a teacher checkpoint in, a student out.

fewstep.method picks the recipe; the math lives in research/diffusion (distillation.py, consistency.py,
karras.py) and this module only wires it into the loop's Trainer contract (init, step, shardings, preview).

  pd  Progressive distillation (Salimans & Ho 2022). Round r distils the N = start / 2^r step DDIM teacher into
      an N/2-step student (`pd_target`, truncated-SNR weighting). Rounds last fewstep.pd_steps_per_round steps.
      At the first step of round r > 0 the state is rewritten in one jitted call: teacher <- student, the new
      student starts as a copy of it, Adam's moments and the learning-rate schedule restart, the sampling EMA
      restarts from it (the paper re-initialises the student from the teacher each round and anneals the rate
      within the round). The swap is a function of the state alone, so a run resumed from the checkpoint at a
      round boundary (which holds the finished student, before the swap) continues exactly.
      The checkpoint at step (r + 1) * steps_per_round holds the (N/2)-step student; `round_table` lists them
      and every checkpoint's meta carries the table.
  cd  Consistency distillation (Song et al. 2023, Alg. 2): student f_theta and EMA target f_theta- (decay
      fewstep.target_ema), the teacher's probability-flow ODE through `vp_denoiser`, one Euler or Heun step.
  ct  Consistency training (CM Alg. 3, curriculum='cm': N(k), mu(k) schedules and an EMA target) or improved
      CT (Song & Dhariwal 2023, curriculum='ict': exponential N(k), lognormal pair sampling, pseudo-Huber,
      1/(sigma_{n+1} - sigma_n) weights, and no EMA target: the target is stop_gradient(theta)). No teacher.
  add Adversarial diffusion distillation (Sauer et al. 2023): a student at a few fixed timesteps trained against
      a discriminator on a frozen feature network plus a distillation term to the frozen teacher; research/tasks/
      add.py builds its trainer and sampler (config section `add`).

Networks. The backbone is the config's model (a U-Net taking (x, t, labels)). A PD student and a CD student
start as the teacher's network, so they keep its VP interface: inputs x_t = x / sqrt(1 + sigma^2) and the integer
timestep nearest in log sigma (`vp_denoiser`). The CD consistency function is CM's boundary parameterisation
over that network read as an EDM network: F = (D(x; sigma) - c_skip^EDM x) / c_out^EDM and
f = c_skip^CM x + c_out^CM F, which is how CM starts from an EDM teacher; f(x, sigma_min) = x bit for bit.
A CT student is trained from scratch in CM's own form: f = c_skip^CM x + c_out^CM F(c_in x, 250 ln sigma),
the U-Net's time input fed 1000 c_noise as in the consistency-models code.

State. TrainState.params is the trained student, ema_params a separate EMA for sampling (train.ema_decay,
0.9999 in the CM paper, 0.99993 in iCT), and TrainState.extra holds {'teacher': ...} (pd, cd) and
{'target': ...} (cd, ct with curriculum='cm'); iCT has no extra arrays. The teacher is copied into the state
at init, so checkpoints are self-contained and resuming does not read the teacher's workdir again.

Host-side schedules. N(k), mu(k) and the PD round are computed on the host from the state's step (one scalar
read per step) and passed to the compiled step as arguments (cm/ict) or select a per-round program (pd);
each round's program compiles once, when the round starts.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.cond import Cond
from research.config import ConfigError
from research.diffusion import consistency as cm
from research.diffusion import distillation as pd_lib
from research.diffusion import gaussian, karras
from research.diffusion.samplers import ddim_sample
from research.run import read_config, resolve_step
from research.sampling import make_denoiser, schedule_from_config, to_uint8
from research.shapes import abstract_net_params, build_network, init_net_params, model_input_shape
from research.tasks import SampleOptions, Samples, Task, Trainer, default_labels, register_task
from research.tasks.common import compile_trainer, model_meta, validate_network
from research.tasks.teacher import load_teacher
from research.train import mesh as mesh_lib
from research.train.state import (
    TrainState,
    apply_gradients,
    ema_decay_at,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)

METHODS = ("pd", "cd", "ct", "add")
CURRICULA = ("cm", "ict")


# ------------------------------------------------------------------------------------------ configuration


def pd_round_count(config) -> int:
    f = config.fewstep
    return pd_lib.pd_num_rounds(f.pd_start_steps, f.pd_final_steps)


def round_table(config) -> list:
    """PD rounds: [{'round', 'teacher_steps', 'student_steps', 'first_step', 'checkpoint_step'}, ...]."""
    spr = config.fewstep.pd_steps_per_round
    rows = []
    for r in range(pd_round_count(config)):
        teacher, student = pd_lib.pd_round_steps(config.fewstep.pd_start_steps, r)
        rows.append(
            {
                "round": r,
                "teacher_steps": teacher,
                "student_steps": student,
                "first_step": r * spr,
                "checkpoint_step": (r + 1) * spr,
            }
        )
    return rows


def student_checkpoint_step(config, student_steps: int) -> int:
    """The checkpoint step that holds the PD student sampling with `student_steps` DDIM steps."""
    for row in round_table(config):
        if row["student_steps"] == student_steps:
            return row["checkpoint_step"]
    have = [row["student_steps"] for row in round_table(config)]
    raise ConfigError(f"no PD round produces a {student_steps}-step student; rounds produce {have}")


def consistency_grid(config, schedule) -> dict:
    """sigma_min, sigma_max, rho of the consistency discretisation.

    A student on the VP interface (cd) cannot see noise levels outside its schedule's range, so the configured
    range is clipped to it (vp_sigma_range); the CT student's EDM interface takes the configured range as is.
    """
    f = config.fewstep
    lo, hi = float(f.sigma_min), float(f.sigma_max)
    if f.method == "cd":
        vp_lo, vp_hi = karras.vp_sigma_range(schedule)
        lo, hi = max(lo, vp_lo), min(hi, vp_hi)
    return {"sigma_min": lo, "sigma_max": hi, "rho": float(f.rho)}


def consistency_sample_sigmas(steps: int, grid: dict) -> np.ndarray:
    """Noise levels of k-step consistency sampling: the first k points of the (k+1)-point EDM grid.

    One step is [sigma_max]. CM chose its 2-step intermediate level by a greedy search on FID; we use this fixed
    grid (it never ends at sigma_min, where f is the identity and a step would be wasted).
    """
    return karras.karras_sigmas(int(steps) + 1, grid["sigma_min"], grid["sigma_max"], grid["rho"])[:steps]


def check_sample_sigmas(sigmas, steps: int, grid: dict) -> None:
    """ConfigError unless `sigmas` are `steps` strictly decreasing levels in (sigma_min, sigma_max] of the run's grid:
    the range its consistency function was trained on (a level at sigma_min would spend a step on the identity)."""
    levels = [float(s) for s in sigmas]
    lo, hi = grid["sigma_min"], grid["sigma_max"]
    if len(levels) != int(steps):
        raise ConfigError(f"{steps} steps need {steps} noise levels, got {levels}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"noise levels {levels} must decrease strictly (the first is usually sigma_max={hi:.4g})")
    # the grid's sigma_max is itself a float64 round trip of the schedule, so a level printed from it may exceed it
    # in the last digits
    if levels[0] > hi * (1 + 1e-6) or levels[-1] <= lo:
        raise ConfigError(f"noise levels {levels} must lie in (sigma_min, sigma_max] = ({lo:.4g}, {hi:.4g}]")


def schedule_points(config, step: int) -> tuple:
    """(N(k), mu(k)) at optimizer step k: the discretisation size and the target network's EMA decay."""
    f, total = config.fewstep, config.train.num_steps
    k = min(int(step), total)
    if f.method == "cd":
        return int(f.num_points), float(f.target_ema)
    if f.curriculum == "cm":
        return (cm.cm_num_points(k, total, s0=f.s0, s1=f.s1), cm.cm_ema_decay(k, total, s0=f.s0, s1=f.s1, mu0=f.mu0))
    return cm.ict_num_points(k, total, s0=f.s0, s1=f.s1), 0.0


def max_points(config) -> int:
    f = config.fewstep
    return int(f.num_points) if f.method == "cd" else int(f.s1) + 1


def has_target(config) -> bool:
    return config.fewstep.method == "cd" or (config.fewstep.method == "ct" and config.fewstep.curriculum == "cm")


def has_teacher(config) -> bool:
    return config.fewstep.method in ("pd", "cd", "add")


# ------------------------------------------------------------------------------------------- denoisers


def _net(model, params, *, train: bool = False, dropout_rng=None):
    rngs = {"dropout": dropout_rng} if train else None

    def apply(x, t, cond):
        return model.apply({"params": params}, x, t, cond, train=train, rngs=rngs)

    return apply


def vp_consistency_fn(net, schedule, prediction: str, *, sigma_min: float, sigma_data: float):
    """CM's boundary parameterisation over a VP network read as an EDM denoiser (see the module docstring)."""
    denoise = karras.vp_denoiser(net, schedule, prediction=prediction)

    def f(x, sigma, cond=None):
        s = karras.batch_sigma(sigma, x)
        c_cm = cm.consistency_preconditioning(s, sigma_data=sigma_data, sigma_min=sigma_min)
        c_edm = karras.edm_preconditioning(s, sigma_data=sigma_data)
        e = lambda a: karras.expand_sigma(a, x)  # noqa: E731
        raw = (denoise(x, s, cond) - e(c_edm.c_skip) * x) / e(c_edm.c_out)
        return (e(c_cm.c_skip) * x + e(c_cm.c_out) * raw).astype(x.dtype)

    return f


def edm_consistency_fn(net, *, sigma_min: float, sigma_data: float):
    """CM's own form f = c_skip x + c_out F(c_in x, 1000 c_noise) for a network trained from scratch (ct)."""
    return cm.consistency_function(
        lambda x_in, c_noise, cond: net(x_in, 1000.0 * c_noise, cond), sigma_data=sigma_data, sigma_min=sigma_min
    )


def student_consistency_fn(config, model, schedule, params, grid, *, train=False, dropout_rng=None):
    net = _net(model, params, train=train, dropout_rng=dropout_rng)
    kw = dict(sigma_min=grid["sigma_min"], sigma_data=config.fewstep.sigma_data)
    if config.fewstep.method == "cd":
        return vp_consistency_fn(net, schedule, config.diffusion.prediction, **kw)
    return edm_consistency_fn(net, **kw)


# ------------------------------------------------------------------------------------------ samplers


def make_student_sampler(config, model, steps: int, batch_size: int, sigmas=None):
    """jitted (params, key, labels) -> SampleResult: the student's k-step sampler.

    pd: DDIM (eta=0) on the student's trailing grid pd_timesteps(T, k), the grid it was distilled on.
    cd/ct: multistep consistency sampling over `consistency_sample_sigmas(k)`, or over the k decreasing noise
    levels `sigmas` (CM's searched intermediate levels; experiments/cm_sigma_search.py).
    """
    if sigmas is not None and config.fewstep.method not in ("cd", "ct"):
        raise ConfigError(f"sigmas: only consistency models sample on chosen noise levels, not {config.fewstep.method}")
    if config.fewstep.method == "add":
        from research.tasks.add import make_add_sampler

        return make_add_sampler(config, model, steps, batch_size)
    schedule = schedule_from_config(config.diffusion)
    shape = (batch_size, *model_input_shape(config))
    if config.fewstep.method == "pd":
        from research.diffusion.schedules import respace

        sched = respace(schedule, pd_lib.pd_timesteps(schedule.num_steps, int(steps)))

        def run(params, key, labels):
            return ddim_sample(
                make_denoiser(model, params),
                sched,
                key,
                shape,
                cond=_cond(labels),
                prediction=config.diffusion.prediction,
                clip_x0=config.sample.clip_x0,
            )
    else:
        grid = consistency_grid(config, schedule)
        if sigmas is None:
            sigmas = consistency_sample_sigmas(steps, grid)
        else:
            check_sample_sigmas(sigmas, steps, grid)

        def run(params, key, labels):
            f = student_consistency_fn(config, model, schedule, params, grid)
            return cm.consistency_sample(f, sigmas, key, shape, sigma_min=grid["sigma_min"], cond=_cond(labels))

    return jax.jit(run)


def _cond(labels):
    return None if labels is None else Cond(label=labels)


def generate(sampler, params, num: int, batch_size: int, seed: int = 0, num_classes: int = 0, progress=False):
    """(samples float32 [num, H, W, C] in the model range, labels [num] (-1 when unconditional), NFE per sample).

    Batch b uses key fold_in(PRNGKey(seed), b); labels follow `default_labels` (classes cycled), as for every
    sampler, so class-conditional students can be scored for accuracy."""
    from tqdm.auto import tqdm

    labels = default_labels(num, num_classes)
    out, nfe = [], 0
    batches = -(-num // batch_size)
    for b in tqdm(range(batches), desc="student", disable=not progress or batches == 1):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
        chunk = None
        if num_classes:
            chunk = jnp.asarray(np.resize(labels[b * batch_size : (b + 1) * batch_size], batch_size))
        res = sampler(params, key, chunk)
        out.append(np.asarray(jax.device_get(res.samples)))
        nfe = int(res.nfe)
    return np.concatenate(out)[:num], labels, nfe


class FewstepPreview:
    """Sample grid of the student: its current round's step count (pd) or fewstep.sample_steps (cd, ct)."""

    def __init__(self, config, model):
        self.config, self.model, self._samplers = config, model, {}

    def __call__(self, state, path: str) -> str:
        from research.images import save_grid

        c = self.config
        step = int(jax.device_get(state.step))
        if c.fewstep.method == "pd":
            rnd = min(max(step - 1, 0) // c.fewstep.pd_steps_per_round, pd_round_count(c) - 1)
            steps = pd_lib.pd_round_steps(c.fewstep.pd_start_steps, rnd)[1]
        else:
            steps = c.fewstep.sample_steps
        num = min(c.sample.num, c.sample.batch_size)
        if steps not in self._samplers:
            self._samplers[steps] = make_student_sampler(c, self.model, steps, num)
        params = state.sampling_params("net", c.sample.use_ema)
        samples, _, _ = generate(
            self._samplers[steps], params, num, num, seed=c.seed, num_classes=c.model.get("num_classes", 0)
        )
        return save_grid(to_uint8(samples, c.data.centered), path)


# -------------------------------------------------------------------------------------------- steps


def _labels(batch, conditional):
    return Cond(label=batch["label"]) if conditional else None


def make_pd_round_step(config, model, schedule, txs, lr_schedule, round_index: int, conditional: bool):
    """The compiled step of PD round `round_index`: (state, batch) -> (state, metrics)."""
    f, tc = config.fewstep, config.train
    teacher_sched, _ = pd_lib.pd_schedules(schedule, f.pd_start_steps, round_index)
    half = teacher_sched.num_steps // 2
    t_table = jnp.asarray(np.asarray(teacher_sched.timesteps, np.int32))
    prediction = config.diffusion.prediction
    round_start = round_index * f.pd_steps_per_round

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        j_key, noise_key, drop_key = jax.random.split(rng, 3)
        x0 = batch["image"]
        cond = _labels(batch, conditional)
        j = jax.random.randint(j_key, (x0.shape[0],), 0, half)
        i = 2 * j + 1  # the student's step j is the teacher's step 2j+1
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        x_t = gaussian.q_sample(teacher_sched, x0, i, noise)
        target = pd_lib.pd_target(
            make_denoiser(model, state.extra["teacher"]),
            teacher_sched,
            x_t,
            j,
            cond,
            teacher_prediction=prediction,
            student_prediction=prediction,
            weighting=f.pd_weighting,
            clip_x0=f.pd_clip_x0,
        )

        def loss_fn(params):
            out = _net(model, params, train=True, dropout_rng=drop_key)(x_t, t_table[i], cond)
            return jnp.mean(pd_lib.pd_loss(out, target))

        loss, grads = jax.value_and_grad(loss_fn)(state.params["net"])
        in_round = state.step - round_start
        new_state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(in_round, tc.ema_decay, tc.ema_warmup))
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(in_round),
            "round": jnp.asarray(round_index, jnp.float32),
            "student_steps": jnp.asarray(half, jnp.float32),
        }
        return new_state, metrics

    return step


def make_pd_begin_round(config, txs):
    """teacher <- student (the sampled one: EMA when sample.use_ema), and the new student, its EMA and the
    optimizer restart from it. Only the arrays change; the step counter and RNG continue."""
    use_ema = config.sample.use_ema

    def begin(state: TrainState):
        student = state.sampling_params("net", use_ema)
        return state.replace(
            params={"net": student},
            ema_params={"net": student},
            opt_state={"net": txs["net"].init(student)},
            extra={"teacher": student},
        )

    return begin


def make_consistency_step(config, model, schedule, txs, lr_schedule, grid, conditional: bool):
    """(state, batch, frozen, num_points int32, target_ema float32) -> (state, metrics) for cd and ct; frozen is
    {'teacher': params} for cd, {} for ct."""
    f, tc = config.fewstep, config.train
    method, prediction = f.method, config.diffusion.prediction
    huber_c = f.huber_c if f.huber_c > 0 else None
    target_kind = "ema" if has_target(config) else "self"
    n_max = max_points(config)
    grid_kw = dict(sigma_min=grid["sigma_min"], sigma_max=grid["sigma_max"], rho=grid["rho"])
    index_kw = dict(distribution=f.index_distribution, max_points=n_max)
    if f.index_distribution == "lognormal":
        index_kw.update(p_mean=f.p_mean, p_std=f.p_std, **grid_kw)

    def step(state: TrainState, batch, frozen, num_points, target_ema):
        rng = jax.random.fold_in(state.rng, state.step)
        idx_key, noise_key, drop_key = jax.random.split(rng, 3)
        x0 = batch["image"]
        cond = _labels(batch, conditional)
        n = cm.sample_pair_index(idx_key, (x0.shape[0],), num_points, **index_kw)
        sigma, sigma_next = cm.pair_sigmas(n, num_points, **grid_kw)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        # The target network sees the same dropout mask as the student, as both are the same network in train mode.
        fn = lambda p: student_consistency_fn(
            config,
            model,
            schedule,
            p,
            grid,
            train=True,  # noqa: E731
            dropout_rng=drop_key,
        )

        def loss_fn(params):
            target_params = state.extra["target"] if target_kind == "ema" else jax.lax.stop_gradient(params)
            kw = dict(distance=f.distance, weighting=f.weighting, c=huber_c)
            if method == "cd":
                teacher = karras.vp_denoiser(_net(model, frozen["teacher"]), schedule, prediction=prediction)
                per = cm.cd_loss(
                    fn(params), fn(target_params), teacher, x0, noise, sigma, sigma_next, cond, solver=f.solver, **kw
                )
            else:
                per = cm.ct_loss(fn(params), fn(target_params), x0, noise, sigma, sigma_next, cond, **kw)
            return jnp.mean(per)

        loss, grads = jax.value_and_grad(loss_fn)(state.params["net"])
        new_state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(state.step, tc.ema_decay, tc.ema_warmup))
        if target_kind == "ema":
            mu = jnp.asarray(target_ema, jnp.float32)
            new_state = new_state.replace(
                extra=dict(
                    state.extra,
                    target=jax.tree.map(
                        lambda t, p: mu * t + (1.0 - mu) * p, state.extra["target"], new_state.params["net"]
                    ),
                )
            )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
            "num_points": jnp.asarray(num_points, jnp.float32),
            "target_ema": jnp.asarray(target_ema, jnp.float32),
        }
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------------ the trainer


def _extra_of(config, params, teacher):
    """PD's round teacher changes every round, so it is trained state (`extra`); CD's teacher never changes and
    is a frozen part, read from its run and referenced in the checkpoint metadata instead of copied."""
    extra = {}
    if config.fewstep.method == "pd":
        extra["teacher"] = teacher
    if has_target(config):
        extra["target"] = params
    return extra or None


@register_task("fewstep")
class FewstepTask(Task):
    """A few-step student from a teacher run (pd, cd) or from scratch (ct); see the module docstring."""

    def validate(self, config) -> None:
        validate_network(config)
        _validate_fewstep(config)

    def resolve(self, config):
        if not config.fewstep.teacher_workdir:
            return config
        import os

        config = config.copy_and_resolve_references()
        config.fewstep.teacher_workdir = os.path.abspath(config.fewstep.teacher_workdir)
        return config

    def build_trainer(self, config, mesh) -> Trainer:
        """Building it reads the teacher's config only; the teacher's weights are read by init (and, for cd, here,
        as a frozen part)."""
        f, tc = config.fewstep, config.train
        if f.method == "add":
            from research.tasks.add import build_add_trainer

            return build_add_trainer(config, mesh)
        model = build_network(config)
        schedule = schedule_from_config(config.diffusion)
        conditional = bool(config.model.get("num_classes", 0))
        horizon = f.pd_steps_per_round if f.method == "pd" else tc.num_steps
        txs = {"net": make_optimizer(config.optim, horizon)}
        lr_schedule = learning_rate_schedule(config.optim, horizon)

        def make_state(params, teacher):
            return init_train_state({"net": params}, txs, config.seed, extra=_extra_of(config, params, teacher))

        abstract_p = abstract_net_params(model, config)
        abstract_state = jax.eval_shape(make_state, abstract_p, abstract_p)
        meta = model_meta(config, abstract_state)
        meta["fewstep"] = {"method": f.method, "teacher_workdir": f.teacher_workdir}
        if f.method == "pd":
            meta["fewstep"]["rounds"] = round_table(config)
        frozen = {}
        if f.method == "cd":
            from research.latents import params_digest

            teacher, teacher_step = load_teacher(config)
            frozen["teacher"] = teacher
            meta["frozen"] = {
                "teacher": {
                    "workdir": f.teacher_workdir,
                    "step": int(teacher_step),
                    "use_ema": bool(f.teacher_use_ema),
                    "sha256": params_digest(teacher),
                }
            }

        def init(key):  # ct: a student from scratch
            params = init_net_params(model, config, key)
            return make_state(params, params)

        def init_from_teacher(trainer):
            """pd, cd: the student starts as the teacher (read from disk for pd, held as a frozen part for cd), so the
            state is built by a jitted function of the teacher's arrays: its outputs are distinct buffers (student,
            EMA, target), as donation needs."""
            make = jax.jit(make_state, out_shardings=trainer.state_sharding)

            def init_state(key):
                teacher = frozen["teacher"] if "teacher" in frozen else load_teacher(config)[0]
                return make(teacher, teacher)

            return init_state

        if f.method == "pd":
            trainer = compile_trainer(config, mesh, model, abstract_state, init, None, meta)  # a program per round
            trainer.init = init_from_teacher(trainer)
            state_sh, batch_sh = trainer.state_sharding, trainer.batch_sharding
            spr, rounds = f.pd_steps_per_round, pd_round_count(config)
            programs = {}
            begin = jax.jit(
                make_pd_begin_round(config, txs), in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=0
            )

            def step(state, batch):
                k = int(jax.device_get(state.step))
                r = min(k // spr, rounds - 1)
                if k > 0 and k % spr == 0 and k // spr < rounds:
                    state = begin(state)
                if r not in programs:
                    programs[r] = jax.jit(
                        make_pd_round_step(config, model, schedule, txs, lr_schedule, r, conditional),
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, None),
                        donate_argnums=0,
                    )
                return programs[r](state, batch)
        else:
            grid = consistency_grid(config, schedule)
            frozen_sh = {k: mesh_lib.frozen_shardings(mesh, k, v, config.train) for k, v in frozen.items()}
            trainer = compile_trainer(
                config,
                mesh,
                model,
                abstract_state,
                init,
                make_consistency_step(config, model, schedule, txs, lr_schedule, grid, conditional),
                meta,
                step_extra_args=(frozen_sh, None, None),
            )
            if has_teacher(config):
                trainer.init = init_from_teacher(trainer)
            program = trainer.step
            frozen_on_mesh = jax.device_put(frozen, frozen_sh)

            def step(state, batch):
                n, mu = schedule_points(config, int(jax.device_get(state.step)))
                return program(state, batch, frozen_on_mesh, np.int32(n), np.float32(mu))

        trainer.step, trainer.schedule = step, schedule
        trainer.context["frozen"] = frozen
        return trainer

    def preview(self, config, trainer):
        return FewstepPreview(config, trainer.model)

    def sampler(self, workdir: str, config, options: SampleOptions):
        """--steps k picks PD's k-step round checkpoint (default: the last round) or the number of consistency
        steps (default fewstep.sample_steps); sampled with the student's own sampler. A consistency run also takes
        --sigmas, its k noise levels (k = their count unless --steps says otherwise)."""
        if options.guidance is not None and float(options.guidance) != 1.0:
            raise ConfigError("a few-step student samples without classifier-free guidance: drop --guidance")
        if options.classifier is not None:
            raise ConfigError("a few-step student samples without classifier guidance: drop --classifier")
        if options.sampler is not None or options.eta is not None or options.grid is not None:
            raise ConfigError(
                "a few-step student has its own sampler (DDIM on its grid for pd, consistency sampling "
                "for cd/ct): drop --sampler / --eta / --grid"
            )
        f = config.fewstep
        if options.sigmas is not None and f.method not in ("cd", "ct"):
            raise ConfigError(
                f"--sigmas picks a consistency model's noise levels; a {f.method} student samples on its own "
                "timesteps (drop --sigmas)"
            )
        default = f.pd_final_steps if f.method == "pd" else f.sample_steps
        if options.sigmas is not None:
            default = len(options.sigmas)
        try:
            k = int(options.steps) if options.steps is not None else int(default)
        except ValueError:
            raise ConfigError(
                f"--steps {options.steps!r}: a few-step student takes a step count, e.g. --steps 4"
            ) from None
        if k < 1:
            raise ConfigError(f"--steps must be >= 1, got {k}")
        if f.method == "add" and k > config.add.student_timesteps:
            raise ConfigError(
                f"--steps {k}: this ADD student was trained at {config.add.student_timesteps} timesteps and samples "
                f"with 1 to {config.add.student_timesteps} steps"
            )
        _, model, params, step = load_student(
            workdir, k if f.method == "pd" else None, use_ema=options.use_ema, step=options.step
        )
        num_classes = int(config.model.get("num_classes", 0))
        levels = ""
        if options.sigmas is not None:
            check_sample_sigmas(options.sigmas, k, consistency_grid(config, schedule_from_config(config.diffusion)))
            levels = "_sigmas" + "-".join(f"{s:g}" for s in options.sigmas)

        def run(num, seed=0, progress=True):
            batch = min(options.batch_size or config.sample.batch_size, num)
            fn = make_student_sampler(config, model, k, batch, sigmas=options.sigmas)
            samples, labels, nfe = generate(
                fn, params, num, batch, seed=seed, num_classes=num_classes, progress=progress
            )
            chosen = f", noise levels {', '.join(f'{s:g}' for s in options.sigmas)}" if levels else ""
            return Samples(
                to_uint8(samples, config.data.centered),
                labels,
                nfe,
                f"samples_{f.method}_{k}steps{levels}_seed{seed}",
                f"the {f.method} student (checkpoint {step}, {k} steps{chosen}, NFE={nfe})",
            )

        run.step = step
        return run


def load_student(workdir: str, steps: Optional[int] = None, use_ema: bool = True, step: Optional[int] = None):
    """(config, model, params, checkpoint step) of a few-step run; for pd, `steps` picks the round's student."""
    config = read_config(workdir)
    if config.fewstep.method == "pd" and steps is not None and step is None:
        step = student_checkpoint_step(config, steps)
    from research.loader import load_run

    return load_run(workdir, resolve_step(workdir, step), use_ema=use_ema)


def _validate_fewstep(config) -> None:
    """task='fewstep': method-specific values, and PD's round / checkpoint layout."""
    f, tc = config.fewstep, config.train
    choices = {
        "method": METHODS,
        "pd_weighting": ("truncated_snr", "snr_plus_one", "none"),
        "solver": ("euler", "heun"),
        "distance": ("l2", "pseudo_huber"),
        "weighting": ("uniform", "ict"),
        "index_distribution": ("uniform", "lognormal"),
        "curriculum": ("cm", "ict"),
    }
    for key, allowed in choices.items():
        if f[key] not in allowed:
            raise ConfigError(f"fewstep.{key}={f[key]!r} is not valid; choose one of {list(allowed)}")
    if config.latent.autoencoder:
        raise ConfigError(
            "latent.autoencoder is for diffusion runs; task='fewstep' distils pixel-space models "
            "(set latent.autoencoder='')"
        )
    if config.diffusion.var_type == "learned_range":
        raise ConfigError(
            "task='fewstep' distils the mean of a fixed-variance model; use a teacher with "
            "diffusion.var_type='fixed_small' or 'fixed_large'"
        )
    if f.method in ("pd", "cd", "add") and not f.teacher_workdir:
        raise ConfigError(f"fewstep.method={f.method!r} distils a teacher: set fewstep.teacher_workdir to its workdir")
    if f.method == "pd":
        try:
            rounds = pd_lib.pd_num_rounds(f.pd_start_steps, f.pd_final_steps)
        except ValueError as e:
            raise ConfigError(f"fewstep.pd_start_steps / pd_final_steps: {e}") from None
        if rounds < 1 or f.pd_start_steps > config.diffusion.timesteps:
            raise ConfigError(
                f"fewstep.pd_start_steps={f.pd_start_steps} must exceed pd_final_steps="
                f"{f.pd_final_steps} and be at most diffusion.timesteps={config.diffusion.timesteps}"
            )
        if f.pd_steps_per_round < 1 or tc.num_steps != rounds * f.pd_steps_per_round:
            raise ConfigError(
                f"train.num_steps={tc.num_steps} must equal the {rounds} rounds times "
                f"fewstep.pd_steps_per_round={f.pd_steps_per_round} = {rounds * f.pd_steps_per_round}"
            )
        if f.pd_steps_per_round % tc.ckpt_every:
            raise ConfigError(
                f"train.ckpt_every={tc.ckpt_every} must divide fewstep.pd_steps_per_round="
                f"{f.pd_steps_per_round} so every round's student is checkpointed"
            )
        if tc.keep_checkpoints is not None and tc.keep_checkpoints < tc.num_steps // tc.ckpt_every:
            raise ConfigError(
                f"train.keep_checkpoints={tc.keep_checkpoints} would delete earlier rounds' students: "
                f"set it to at least {tc.num_steps // tc.ckpt_every} (or None to keep all)"
            )
    if not 0.0 < f.sigma_min < f.sigma_max:
        raise ConfigError(f"need 0 < fewstep.sigma_min < fewstep.sigma_max, got {f.sigma_min}, {f.sigma_max}")
    if f.rho <= 0 or f.sigma_data <= 0 or f.p_std <= 0 or f.huber_c < 0:
        raise ConfigError("fewstep.rho, sigma_data and p_std must be positive and huber_c >= 0")
    if f.method == "cd":
        if f.num_points < 2 or not 0.0 <= f.target_ema < 1.0:
            raise ConfigError(
                f"cd needs fewstep.num_points >= 2 and 0 <= fewstep.target_ema < 1, got {f.num_points}, {f.target_ema}"
            )
    if f.method == "ct":
        if f.s0 < 1 or f.s1 < f.s0:
            raise ConfigError(f"ct needs 1 <= fewstep.s0 <= fewstep.s1, got s0={f.s0}, s1={f.s1}")
        if f.curriculum == "cm" and (f.s0 < 2 or not 0.0 < f.mu0 < 1.0):
            raise ConfigError(
                f"curriculum='cm' needs fewstep.s0 >= 2 (N(0) = s0 points) and 0 < mu0 < 1, got s0={f.s0}, mu0={f.mu0}"
            )
    if f.sample_steps < 1:
        raise ConfigError(f"fewstep.sample_steps must be >= 1, got {f.sample_steps}")
    if f.method == "add":
        from research.tasks.add import validate_add

        validate_add(config)


__all__ = [
    "CURRICULA",
    "METHODS",
    "FewstepTask",
    "check_sample_sigmas",
    "consistency_sample_sigmas",
    "generate",
    "load_student",
    "make_student_sampler",
    "round_table",
    "schedule_points",
    "student_checkpoint_step",
    "vp_consistency_fn",
]
