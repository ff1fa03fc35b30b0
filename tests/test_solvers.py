"""DPM-Solver++ (2M, 3M, 2S) and UniPC against diffusers' DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
and UniPCMultistepScheduler, and against the exact probability-flow ODE of Gaussian data.

diffusers builds alphas_cumprod as a float32 cumulative product; the reference schedulers here get it recomputed in
float64 from their own betas (our Schedule is built from the same betas), so the comparisons check formulas and
grids, not float32 cumprod rounding. diffusers still rounds its sigmas to float32 and (multistep) the sample to
float32 on every step; our solvers run in float32. Measured worst differences: grids 6e-8 relative (sigmas) with
identical timesteps; single steps 9.3e-7 relative to max(1, |x|) over every step of the 48 method x prediction x
grid cases; whole trajectories 5.5e-7 relative (L2). Asserted: 1e-6, 1e-5 and 1e-5. A wrong coefficient shows up
at >1e-3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (the test extra installs it; a missing reference must fail, not skip)
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler

from research import diffusion as D

T = 1000
SHAPE = (2, 4, 4, 3)  # [B, H, W, C]; C = 3 because diffusers' learned-variance split hard-codes 3 channels
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# sampler name -> (SOLVER_METHODS entry, default order, diffusers class, its config)
METHODS = {
    "dpm++2m": ("dpmpp_multistep", 2, DPMSolverMultistepScheduler, {"solver_order": 2}),
    "dpm++3m": ("dpmpp_multistep", 3, DPMSolverMultistepScheduler, {"solver_order": 3}),
    "dpm++2s": ("dpmpp_singlestep", 2, DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "unipc": ("unipc", 2, UniPCMultistepScheduler, {}),
}
OUR_GRID = {
    "uniform": {"grid": "uniform"},
    "leading": {"grid": "uniform", "spacing": "leading"},
    "trailing": {"grid": "uniform", "spacing": "trailing"},
    "logsnr": {"grid": "logsnr"},
    "karras": {"grid": "karras"},
}
_SPACING = {"uniform": {}, "leading": {"timestep_spacing": "leading"}, "trailing": {"timestep_spacing": "trailing"}}
_SIGMAS = {"logsnr": {"use_lu_lambdas": True}, "karras": {"use_karras_sigmas": True}}
# The grids each diffusers scheduler builds itself (the singlestep one has no timestep_spacing option).
NATIVE = {
    DPMSolverMultistepScheduler: {**_SPACING, **_SIGMAS},
    DPMSolverSinglestepScheduler: {"uniform": {}, "karras": _SIGMAS["karras"]},
    UniPCMultistepScheduler: {**_SPACING, "karras": _SIGMAS["karras"]},
}


def _t(a):
    # NHWC numpy -> NCHW float64 torch (diffusers' updates are elementwise apart from thresholding's flatten).
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))))


def _np(x):
    return np.transpose(x.double().numpy(), (0, 2, 3, 1))


def _reference(cls, grid, steps, beta_schedule="linear", **kw):
    """(our Schedule, diffusers scheduler after set_timesteps(steps), our SolverGrid) on the same betas.

    Where diffusers cannot build `grid` for this scheduler (2S: trailing, log-SNR; UniPC: log-SNR) it gets ours
    installed: its step reads only `sigmas` and `timesteps`, and test_grids_match_diffusers checks our grids
    against the multistep scheduler's."""
    native = NATIVE[cls].get(grid)
    ref = cls(num_train_timesteps=T, beta_schedule=beta_schedule, **(native or {}), **kw)
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), 0)
    sched = D.Schedule.from_betas(ref.betas.double().numpy())
    ref.set_timesteps(steps)
    g = D.solver_grid(sched, steps, **OUR_GRID[grid])
    if native is None:
        ref.sigmas = torch.from_numpy(g.sigmas.astype(np.float32))
        ref.timesteps = torch.from_numpy(g.timesteps)
    return sched, ref, g


# ------------------------------------------------------------------------------------------------------ grids


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("grid", ["uniform", "leading", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [1, 7, 10, 25])
def test_grids_match_diffusers(grid, steps, beta_schedule):
    if beta_schedule == "squaredcos_cap_v2" and grid in _SIGMAS:
        # Documented difference: diffusers' multistep scheduler truncates (not rounds) these timesteps for cosine.
        beta_schedule = "scaled_linear"
    classes = [c for c in NATIVE if grid in NATIVE[c]]
    for cls in classes:
        if cls is DPMSolverSinglestepScheduler and grid == "karras" and steps == 1:
            continue  # its karras ramp divides by steps - 1 the same way; one class suffices for the 1-step case
        _, ref, g = _reference(cls, grid, steps, beta_schedule)
        np.testing.assert_array_equal(g.timesteps, ref.timesteps.numpy(), err_msg=cls.__name__)
        assert g.sigmas[-1] == 0.0 and g.sigmas.shape == (steps + 1,)
        np.testing.assert_allclose(g.sigmas[:-1], ref.sigmas.double().numpy()[:-1], rtol=1e-6, err_msg=cls.__name__)


def test_grid_on_respaced_schedule_uses_its_steps_and_original_timesteps():
    full = D.make_schedule("linear", T)
    g = D.solver_grid(full, 10)
    respaced = D.respace(full, g.timesteps)
    every = D.solver_grid(respaced)  # steps=None: every step of the respaced schedule
    np.testing.assert_array_equal(every.timesteps, g.timesteps)
    np.testing.assert_allclose(every.sigmas, g.sigmas, rtol=1e-12)
    # Interpolated grids report ORIGINAL timesteps: the karras ends are the respaced schedule's end steps.
    k = D.solver_grid(respaced, 6, "karras")
    assert k.timesteps[0] == g.timesteps[0] and k.timesteps[-1] == g.timesteps[-1]
    np.testing.assert_allclose(k.sigmas[[0, 5]], g.sigmas[[0, 9]], rtol=1e-12)


# ------------------------------------------------------------------------------------------------ single steps


def _compare_steps(name, pred, grid, steps, *, ref_kw=None, plan_kw=None, seed=0, out_channels=3, skip_last=False):
    """Drive diffusers' step and our solver_step with the same fake model outputs; compare x after every step."""
    method, order, cls, cls_kw = METHODS[name]
    ref_kw, plan_kw = dict(ref_kw or {}), dict(plan_kw or {})
    order = plan_kw.pop("order", order)
    sched, ref, _ = _reference(cls, grid, steps, prediction_type=PRED[pred], **{**cls_kw, **ref_kw})
    plan = D.solver_plan(sched, method, steps=steps, order=order, prediction=pred, **OUR_GRID[grid], **plan_kw)
    np.testing.assert_array_equal(plan.grid.timesteps, ref.timesteps.numpy())
    if cls is DPMSolverSinglestepScheduler:
        assert plan.orders.tolist() == ref.order_list
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    state, xr = D.solver_init(plan, jnp.asarray(x)), _t(x)
    worst = 0.0
    for k, t in enumerate(ref.timesteps):
        out = rng.standard_normal(SHAPE[:3] + (out_channels,)).astype(np.float32)
        state = D.solver_step(plan, state, k, jnp.asarray(out))
        if skip_last and k == steps - 1:
            break
        # diffusers' multistep scheduler drops learned-variance channels itself (variance_type); UniPC cannot.
        xr = ref.step(_t(out if "variance_type" in ref_kw else out[..., :3]), t, xr).prev_sample
        want, got = _np(xr), np.asarray(state.x, np.float64)
        err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
        assert err < 1e-5, f"{name} {pred} {grid}: step {k} (order {plan.orders[k]}) differs by {err:.2e}"
        worst = max(worst, err)
    return plan, state, worst


@pytest.mark.parametrize("grid", ["uniform", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_step_matches_diffusers(name, pred, grid):
    _compare_steps(name, pred, grid, 10)


@pytest.mark.parametrize(
    "name,steps,ref_kw,plan_kw",
    [
        ("dpm++2m", 10, {"solver_type": "heun"}, {"solver_type": "heun"}),
        ("dpm++2s", 9, {"solver_type": "heun"}, {"solver_type": "heun"}),
        ("dpm++2s", 9, {}, {}),  # odd: pairs (1, 2) then a single first-order step
        ("dpm++2m", 1, {}, {}),
        ("dpm++3m", 20, {}, {}),  # >= 15 steps: only the very last step drops order
        ("dpm++3m", 10, {"lower_order_final": False}, {"lower_order_final": False}),
        ("unipc", 10, {"solver_order": 3}, {"order": 3}),
        ("unipc", 10, {"solver_order": 1}, {"order": 1}),
        ("unipc", 10, {"disable_corrector": [0, 4]}, {"disable_corrector": (0, 4)}),
        ("dpm++2m", 10, {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, None),
        ("unipc", 10, {"thresholding": True}, {"thresholding": True}),
        # Plain clipping is dynamic thresholding with the threshold pinned to 1.
        ("dpm++2s", 10, {"thresholding": True, "sample_max_value": 1.0}, {"clip_x0": True}),
    ],
)
def test_step_variants_match_diffusers(name, steps, ref_kw, plan_kw):
    plan_kw = dict(ref_kw) if plan_kw is None else plan_kw
    _compare_steps(name, "eps", "uniform", steps, ref_kw=ref_kw, plan_kw=plan_kw, seed=steps)


def test_unipc_without_lower_order_final_matches_diffusers_until_its_nan_final_step():
    # With lower_order_final=False diffusers' UniPC takes the last step onto sigma = 0 at full order: r = 0 there,
    # so order 2 returns inf/NaN and order 3 a singular solve; ours takes that step at first order and ends on the
    # last x0 prediction.
    ref_kw = {"lower_order_final": False, "solver_order": 3}
    plan, state, _ = _compare_steps(
        "unipc", "eps", "uniform", 12, ref_kw=ref_kw, plan_kw={"lower_order_final": False, "order": 3}, skip_last=True
    )
    assert plan.orders.tolist() == [1, 2] + [3] * 9 + [1]
    np.testing.assert_allclose(state.x, state.history[0], atol=1e-6)


def test_learned_variance_channels_are_ignored():
    _compare_steps("dpm++2m", "eps", "uniform", 6, ref_kw={"variance_type": "learned_range"}, out_channels=6)
    _compare_steps("unipc", "eps", "uniform", 6, plan_kw={"var_type": "learned_range"}, out_channels=6)


def test_unipc_bh1_matches_diffusers_and_stays_finite_at_sigma_zero():
    # diffusers' bh1 computes (-inf) * 0 on the last step (B(h) = -h with lambda = inf) and returns NaN; here that
    # first-order step lands exactly on the last x0 prediction.
    plan, state, _ = _compare_steps(
        "unipc", "eps", "uniform", 8, ref_kw={"solver_type": "bh1"}, plan_kw={"solver_type": "bh1"}, skip_last=True
    )
    np.testing.assert_allclose(state.x, state.history[0], atol=1e-6)
    assert np.all(np.isfinite(plan.update)) and np.all(np.isfinite(plan.corrector))


# --------------------------------------------------------------------------------- whole trajectories, Gaussian data

S_DATA = 0.5  # data ~ N(MU, S_DATA^2 I): the exact eps/x0/v of every x_t is affine in x_t
MU = np.random.default_rng(1).standard_normal(SHAPE[1:]) * 0.3


def _gauss_tables(sched, pred):
    """(a_t, b_t) with exact output(x_t, t) = a_t x_t + b_t MU, float64 per training step."""
    acp = sched.alphas_cumprod
    al, sg = np.sqrt(acp), np.sqrt(1.0 - acp)
    g = al * S_DATA**2 / (acp * S_DATA**2 + 1.0 - acp)  # E[x0 | x_t] = g x_t + (1 - al g) MU
    if pred == "x0":
        return g, 1.0 - al * g
    ea, eb = (1.0 - al * g) / sg, -al * (1.0 - al * g) / sg
    if pred == "eps":
        return ea, eb
    return al * ea - sg * g, al * eb - sg * (1.0 - al * g)


def _gauss_jax(sched, pred):
    a, b = (jnp.asarray(c, jnp.float32) for c in _gauss_tables(sched, pred))
    mu = jnp.asarray(MU, jnp.float32)

    def denoise(x, t, cond):
        return a[t][:, None, None, None] * x + b[t][:, None, None, None] * mu

    return denoise


def _gauss_exact_endpoint(sched, x_T):
    """Exact probability-flow ODE solution at sigma = 0 from x_T at the last training step: in y = x / alpha,
    y - MU scales as sqrt(S_DATA^2 + sigma^2)."""
    sig = np.sqrt((1.0 - sched.alphas_cumprod[-1]) / sched.alphas_cumprod[-1])
    return MU + (x_T * np.sqrt(1.0 + sig**2) - MU) * S_DATA / np.sqrt(S_DATA**2 + sig**2)


@pytest.mark.parametrize(
    "name,steps,pred,grid",
    [(n, s, "eps", "uniform") for n in METHODS for s in (5, 10, 20)]
    + [("dpm++2m", 10, "v", "logsnr"), ("dpm++3m", 10, "x0", "karras"), ("unipc", 10, "v", "karras")],
)
def test_trajectory_matches_diffusers(name, steps, pred, grid):
    method, order, cls, cls_kw = METHODS[name]
    sched, ref, _ = _reference(cls, grid, steps, prediction_type=PRED[pred], **cls_kw)
    a, b = _gauss_tables(sched, pred)
    mu = _t(MU[None])
    x_T = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    x, calls = _t(x_T), 0
    for t in ref.timesteps:
        x = ref.step(float(a[int(t)]) * x.double() + float(b[int(t)]) * mu, t, x).prev_sample
        calls += 1
    want = _np(x)
    f = _gauss_jax(sched, pred)
    kw = dict(steps=steps, prediction=pred, **OUR_GRID[grid])
    res = jax.jit(lambda x0: D.sample(name, f, sched, None, SHAPE, x_init=x0, **kw))(jnp.asarray(x_T))
    got = np.asarray(res.samples, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert int(res.nfe) == calls == steps


def test_dpm_solver_2m_lands_closer_to_the_exact_ode_solution_than_ddim():
    """10 steps from the same x_T on N(MU, 0.25 I) data with the exact eps model, linear schedule; RMS distance to
    the exact ODE endpoint (the data are ~0.53 RMS). Measured:

      uniform (linspace) grid: DDIM 0.126, DPM-Solver++ 2M 0.093 (3M 0.089, 2S 0.118, UniPC 0.089);
      log-SNR grid: DPM-Solver++ order 1 (= DDIM, checked equal to ddim_sample below) 0.114, 2M 0.0154.
      (20 uniform steps: DDIM 0.067, 2M 0.022.)

    On the uniform grid both runs end with the same first-order jump from t=100 to sigma=0, which costs most of
    the remaining error; the log-SNR grid ends at sigma_min and shows the second-order gain in full.
    """
    sched = D.make_schedule("linear", T)
    f = _gauss_jax(sched, "eps")
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    exact = _gauss_exact_endpoint(sched, x_T)

    def rms(res):
        return float(np.sqrt(np.mean((np.asarray(res.samples, np.float64) - exact) ** 2)))

    g = D.solver_grid(sched, 10)
    ddim = D.ddim_sample(f, D.respace(sched, g.timesteps), jax.random.PRNGKey(0), SHAPE, clip_x0=False, x_init=x_T)
    first = D.dpm_solver_pp_sample(f, sched, None, SHAPE, steps=10, order=1, x_init=x_T)
    np.testing.assert_allclose(first.samples, ddim.samples, atol=1e-5)
    dpm2m = D.sample("dpm++2m", f, sched, None, SHAPE, steps=10, x_init=x_T)
    assert rms(dpm2m) < 0.8 * rms(ddim), (rms(dpm2m), rms(ddim))
    first_lsnr = D.dpm_solver_pp_sample(f, sched, None, SHAPE, steps=10, order=1, grid="logsnr", x_init=x_T)
    dpm2m_lsnr = D.dpm_solver_pp_sample(f, sched, None, SHAPE, steps=10, grid="logsnr", x_init=x_T)
    assert rms(dpm2m_lsnr) < 0.2 * rms(first_lsnr), (rms(dpm2m_lsnr), rms(first_lsnr))


# ------------------------------------------------------------------------------------ jit, determinism, NFE, errors


def test_samplers_are_jittable_deterministic_and_draw_x_T_like_ddim():
    sched = D.make_schedule("linear", T)
    f = _gauss_jax(sched, "eps")
    names = list(METHODS)
    run = jax.jit(lambda key: [D.sample(n, f, sched, key, SHAPE, steps=6) for n in names])
    key = jax.random.PRNGKey(3)
    first, again, other = run(key), run(key), run(jax.random.PRNGKey(4))
    x_T = jax.random.normal(jax.random.split(key)[0], SHAPE)  # the samplers' documented x_T
    for n, r1, r2, r3 in zip(names, first, again, other):
        np.testing.assert_array_equal(r1.samples, r2.samples)
        assert not np.allclose(r1.samples, r3.samples)
        eager = D.sample(n, f, sched, None, SHAPE, steps=6, x_init=x_T)
        np.testing.assert_allclose(r1.samples, eager.samples, rtol=1e-5, atol=1e-6)
        assert r1.nfe.dtype == jnp.int32 and int(r1.nfe) == 6


@pytest.mark.parametrize("name", list(METHODS))
def test_nfe_counts_model_executions(name):
    sched = D.make_schedule("linear", T)
    calls = []

    def f(x, t, cond):
        assert cond == {"tag": 1}  # passed through untouched
        jax.debug.callback(lambda: calls.append(1))
        return 0.1 * x

    run = jax.jit(lambda x: D.sample(name, f, sched, None, SHAPE, steps=7, x_init=x, cond={"tag": 1}))
    res = run(jnp.ones(SHAPE))
    jax.block_until_ready(res)
    jax.effects_barrier()
    assert int(res.nfe) == len(calls) == 7


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"grid": "cosine"}, "unknown solver grid 'cosine'"),
        ({"spacing": "middle"}, "unknown timestep spacing 'middle'"),
        ({"steps": 2000}, r"steps must be in \[1, 1000\]"),
        ({"order": 4}, "supports order 1..3"),
        ({"solver_type": "bh2"}, "unknown solver_type 'bh2'"),
        ({"prediction": "score"}, "unknown prediction 'score'"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(kw, match):
    sched = D.make_schedule("linear", T)
    kw = {"steps": 10, **kw}
    with pytest.raises(ValueError, match=match):
        D.dpm_solver_pp_sample(lambda x, t, c: x, sched, None, SHAPE, x_init=np.zeros(SHAPE), **kw)


def test_mismatched_output_channels_fail():
    sched = D.make_schedule("linear", T)
    plan = D.solver_plan(sched, "unipc", steps=5, var_type="learned_range")
    state = D.solver_init(plan, jnp.zeros(SHAPE))
    with pytest.raises(ValueError, match="learned_range' needs 2C=6 output channels"):
        D.solver_step(plan, state, 0, jnp.zeros(SHAPE))
    with pytest.raises(ValueError, match="does not match x shape"):
        D.solver_step(D.solver_plan(sched, "unipc", steps=5), state, 0, jnp.zeros(SHAPE[:3] + (4,)))
