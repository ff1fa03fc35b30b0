"""Numerical tests for research.diffusion against diffusers' schedulers and closed forms.

diffusers builds its tables in float32; where a test needs more than float32 agreement it upcasts
the scheduler's betas to float64 and recomputes the derived tables with diffusers' own formulas, so
the comparison checks formulas rather than rounding. Our JAX code runs in float32 throughout; the
tolerances (~1e-5) are far below the size of any wrong-constant error (>1e-3 for these inputs).
"""

import subprocess
import sys

import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (the test extra installs it; a missing reference must fail, not skip)
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from research import diffusion as D  # noqa: E402

T = 1000
SHAPE = (2, 4, 4, 3)  # [B, H, W, C]
DIFFUSERS_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
OURS_TO_DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _upcast(sched):
    """Recompute a diffusers scheduler's tables in float64 from its (float32) betas."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


def _ours_from(sched) -> D.Schedule:
    """Our schedule built from exactly diffusers' betas, so step tests isolate step formulas."""
    return D.Schedule.from_betas(sched.betas.double().numpy())


def _rand(seed, shape=SHAPE, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def _t(a):
    # NHWC numpy -> NCHW float64 torch; diffusers' steps are elementwise except the channel split.
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).double()


def _np(x):
    return np.transpose(x.numpy(), (0, 2, 3, 1))


def _j(a):
    return jnp.asarray(a, jnp.float32)


# ----------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES + ["sigmoid"])
def test_betas_and_alphas_cumprod_match_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=name)
    ours = D.make_schedule(name, T)
    assert ours.betas.dtype == np.float64 and ours.num_steps == T
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    # diffusers' own float32 cumprod, then the same product formed in float64.
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod, _upcast(ref).alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(ours.timesteps, np.arange(T))


def test_cosine_alias_and_closed_form():
    a, b = D.get_betas("cosine", T), D.get_betas("squaredcos_cap_v2", T)
    np.testing.assert_array_equal(a, b)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    u = np.arange(T) / T
    expect = np.minimum(1 - f(u + 1 / T) / f(u), 0.999)
    np.testing.assert_allclose(a, expect, rtol=1e-12)
    assert a[-1] == 0.999  # the cap is active at the end
    # Cumulative product telescopes to the normalised alpha_bar (up to the final cap).
    np.testing.assert_allclose(np.cumprod(1 - a)[:-1], f(u[1:])[: T - 1] / f(0), rtol=1e-9)


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
def test_posterior_variance_matches_diffusers(name):
    ref = _upcast(DDPMScheduler(num_train_timesteps=T, beta_schedule=name))
    ours = _ours_from(ref)
    small = np.array([ref._get_variance(t, variance_type="fixed_small").item() for t in range(T)])
    large = np.array([ref._get_variance(t, variance_type="fixed_large").item() for t in range(T)])
    # diffusers clamps the exactly-zero variance at t=0 to 1e-20 before taking logs.
    np.testing.assert_allclose(ours.posterior_variance, small, rtol=1e-9, atol=1e-19)
    np.testing.assert_allclose(ours.betas, large, rtol=1e-12)
    # Closed forms for the iDDPM log variances. Intentional difference from diffusers: at t=0
    # fixed_small uses log(posterior_variance[1]) (diffusers: log 1e-20) and fixed_large uses
    # log(posterior_variance[1]) (diffusers: log beta_0). Neither sampler adds noise at t=0, so
    # this only affects likelihood evaluation.
    pv = ours.posterior_variance
    np.testing.assert_allclose(ours.posterior_log_variance_clipped[1:], np.log(small[1:]), rtol=1e-9)
    assert ours.posterior_log_variance_clipped[0] == np.log(pv[1])
    np.testing.assert_allclose(ours.fixed_large_log_variance[1:], np.log(large[1:]), rtol=1e-9)
    assert ours.fixed_large_log_variance[0] == np.log(pv[1])
    acp, acp_prev = ours.alphas_cumprod, ours.alphas_cumprod_prev
    assert acp_prev[0] == 1.0
    np.testing.assert_allclose(ours.posterior_mean_coef1, ours.betas * np.sqrt(acp_prev) / (1 - acp))
    np.testing.assert_allclose(ours.posterior_mean_coef2, (1 - acp_prev) * np.sqrt(1 - ours.betas) / (1 - acp))


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_respaced_posterior_matches_diffusers_set_timesteps(name):
    # DDPMScheduler.set_timesteps(50) recomputes beta between consecutive kept timesteps, which is
    # exactly what `respace` does; compare both posterior variances and the learned_range endpoint.
    ref = _upcast(DDPMScheduler(num_train_timesteps=T, beta_schedule=name))
    ref.set_timesteps(50)
    ours = D.respace(_ours_from(ref), D.space_timesteps(T, "ddim50"))
    np.testing.assert_array_equal(ours.timesteps[::-1], ref.timesteps.numpy())
    for i, t in enumerate(ours.timesteps):
        small = ref._get_variance(int(t), variance_type="fixed_small").item()
        large = ref._get_variance(int(t), variance_type="fixed_large").item()
        np.testing.assert_allclose(ours.posterior_variance[i], small, rtol=1e-9, atol=1e-19)
        np.testing.assert_allclose(ours.betas[i], large, rtol=1e-9)


def test_space_timesteps_known_cases():
    assert D.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert D.space_timesteps(50, "ddim20") == list(range(0, 40, 2))
    assert D.space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert D.space_timesteps(10, 10) == list(range(10))
    assert D.space_timesteps(10, 1) == [0]
    assert D.space_timesteps(100, 2) == [0, 99]
    assert D.space_timesteps(10, "5, 1,1, 3") == [1, 3, 5]
    assert D.space_timesteps(10, [9, 0, 4]) == [0, 4, 9]
    assert D.space_timesteps(10, (2,)) == [2]
    # 'ddimN' is diffusers' 'leading' spacing and int N is its 'linspace' spacing, including N that
    # do not divide T (there 'ddimN' still yields exactly N steps).
    for n in (50, 30, 7):
        lead = DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading")
        lead.set_timesteps(n)
        assert D.space_timesteps(T, f"ddim{n}") == sorted(lead.timesteps.tolist())
        lin = DDIMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
        lin.set_timesteps(n)
        assert D.space_timesteps(T, n) == sorted(lin.timesteps.tolist())


def test_respace_recomputes_betas():
    full = D.make_schedule("linear", T)
    use = D.space_timesteps(T, 10)
    r = D.respace(full, use)
    np.testing.assert_array_equal(r.timesteps, use)
    assert r.num_steps == 10 and r.timesteps.dtype == np.int64
    np.testing.assert_allclose(np.cumprod(1 - r.betas), full.alphas_cumprod[use], rtol=1e-12)
    np.testing.assert_allclose(r.alphas_cumprod, full.alphas_cumprod[use], rtol=1e-12)
    assert r.betas[0] == pytest.approx(1 - full.alphas_cumprod[0], rel=1e-12)
    assert r.betas[1] == pytest.approx(1 - full.alphas_cumprod[111] / full.alphas_cumprod[0], rel=1e-12)
    # Respacing to every step is the identity.
    same = D.respace(full, range(T))
    np.testing.assert_allclose(same.betas, full.betas, rtol=1e-9)
    # Respacing a respaced schedule indexes its steps and keeps the original timesteps.
    rr = D.respace(r, [0, 5, 9])
    np.testing.assert_array_equal(rr.timesteps, [0, 555, 999])
    np.testing.assert_allclose(rr.alphas_cumprod, full.alphas_cumprod[[0, 555, 999]], rtol=1e-12)


def test_schedule_is_frozen_hashable_and_jit_static():
    s = D.make_schedule("linear", 20)
    assert hash(s) == hash(s) and s == s and s != D.make_schedule("linear", 20)
    with pytest.raises(AttributeError):
        s.betas = s.betas
    with pytest.raises(ValueError):
        s.betas[0] = 0.5  # read-only tables
    f = jax.jit(lambda sched, x: D.q_sample(sched, x, jnp.array([3, 7]), x), static_argnums=0)
    x = jnp.ones((2, 2, 2, 1))
    np.testing.assert_allclose(
        f(s, x)[:, 0, 0, 0], s.sqrt_alphas_cumprod[[3, 7]] + s.sqrt_one_minus_alphas_cumprod[[3, 7]], rtol=1e-6
    )


# ------------------------------------------------------------------------------------- gaussian math


def test_q_sample_and_velocity_match_diffusers():
    ref = _upcast(DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear"))
    ours = _ours_from(ref)
    x0, noise = _rand(0), _rand(1)
    t = np.array([3, 871])
    want = _np(ref.add_noise(_t(x0), _t(noise), torch.from_numpy(t)))
    np.testing.assert_allclose(D.q_sample(ours, _j(x0), t, _j(noise)), want, atol=1e-5)
    want_v = _np(ref.get_velocity(_t(x0), _t(noise), torch.from_numpy(t)))
    np.testing.assert_allclose(D.predict_v(ours, _j(x0), t, _j(noise)), want_v, atol=1e-5)
    np.testing.assert_allclose(D.training_target(ours, _j(x0), t, _j(noise), "v"), want_v, atol=1e-5)


def _round_trip(s, t, dtype, tol):
    x0, eps = jnp.asarray(_rand(2), dtype), jnp.asarray(_rand(3), dtype)
    x_t = D.q_sample(s, x0, t, eps)
    assert x_t.dtype == dtype
    v = D.predict_v(s, x0, t, eps)
    tol = dict(rtol=tol, atol=tol)
    np.testing.assert_allclose(D.predict_x0_from_eps(s, x_t, t, eps), x0, **tol)
    np.testing.assert_allclose(D.predict_eps_from_x0(s, x_t, t, x0), eps, **tol)
    np.testing.assert_allclose(D.predict_x0_from_v(s, x_t, t, v), x0, **tol)
    np.testing.assert_allclose(D.predict_eps_from_v(s, x_t, t, v), eps, **tol)
    # interpret_output recovers (x0, eps) from the training target of every parameterisation.
    for pred in D.PREDICTIONS:
        out = D.training_target(s, x0, t, eps, pred)
        mp = D.interpret_output(s, x_t, t, out, prediction=pred)
        assert mp.x0.dtype == dtype
        np.testing.assert_allclose(mp.x0, x0, **tol)
        np.testing.assert_allclose(mp.eps, eps, **tol)


@pytest.mark.parametrize("t", [[17, 650], [5, 500]])
def test_conversions_round_trip_float32(t):
    _round_trip(D.make_schedule("linear", T), np.array(t), jnp.float32, 1e-5)


def test_conversions_round_trip_float64():
    # Near t=0, eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) divides by ~0.01, which amplifies
    # float32 rounding of x_t to ~1e-5; float64 checks the algebra there without that noise.
    with jax.enable_x64(True):
        s = D.make_schedule("cosine", T)
        for t in ([0, 1], [2, 999], [500, 998]):
            _round_trip(s, np.array(t), jnp.float64, 1e-10)


def test_extract_scalar_and_batch():
    arr = np.arange(5, dtype=np.float64) / 10
    assert D.extract(arr, 3, 4).shape == ()
    c = D.extract(arr, jnp.array([1, 4]), 4, jnp.float32)
    assert c.shape == (2, 1, 1, 1) and c.dtype == jnp.float32
    np.testing.assert_allclose(c[:, 0, 0, 0], [0.1, 0.4], rtol=1e-7)


def test_interpret_output_variances_and_clip():
    s = D.make_schedule("linear", T)
    t = np.array([0, 500])
    x_t, eps = _j(_rand(4)), _j(_rand(5))
    for v, expect in [(-1.0, s.posterior_log_variance_clipped[t]), (1.0, np.log(s.betas[t]))]:
        out = jnp.concatenate([eps, jnp.full_like(eps, v)], axis=-1)
        mp = D.interpret_output(s, x_t, t, out, var_type="learned_range")
        assert mp.log_variance.shape == SHAPE
        np.testing.assert_allclose(mp.log_variance[:, 0, 0, 0], expect, rtol=1e-6)
        np.testing.assert_allclose(mp.eps, eps, rtol=1e-6)
    mid = D.interpret_output(s, x_t, t, jnp.concatenate([eps, jnp.zeros_like(eps)], -1), var_type="learned_range")
    np.testing.assert_allclose(
        mid.log_variance[:, 0, 0, 0], 0.5 * (s.posterior_log_variance_clipped[t] + np.log(s.betas[t])), rtol=1e-6
    )
    small = D.interpret_output(s, x_t, t, eps, var_type="fixed_small").log_variance
    large = D.interpret_output(s, x_t, t, eps, var_type="fixed_large").log_variance
    np.testing.assert_allclose(small[:, 0, 0, 0], np.log(s.posterior_variance[[1, 500]]), rtol=1e-6)
    np.testing.assert_allclose(large[:, 0, 0, 0], np.log([s.posterior_variance[1], s.betas[500]]), rtol=1e-6)
    # Clipping x0 recomputes eps, so (x0, eps) still reproduce x_t.
    big = D.interpret_output(s, x_t, t, eps * 50, clip_x0=True)
    assert float(jnp.max(jnp.abs(big.x0))) <= 1.0 and float(jnp.max(jnp.abs(big.x0))) == 1.0
    np.testing.assert_allclose(D.q_sample(s, big.x0, t, big.eps), x_t, atol=1e-5)


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
def test_learned_range_matches_diffusers(name):
    ref = _upcast(DDPMScheduler(num_train_timesteps=T, beta_schedule=name, variance_type="learned_range"))
    ours = _ours_from(ref)
    v = np.random.default_rng(6).uniform(-1, 1, (1, 1, 1, 3))
    x = _j(np.zeros((1, 1, 1, 3)))
    for t in (1, 2, 300, 999):  # t=0 differs by design, see test_posterior_variance_matches_diffusers
        want = ref._get_variance(t, predicted_variance=_t(v)).numpy().ravel()
        out = jnp.concatenate([x, _j(v)], -1)
        got = D.interpret_output(ours, x, np.array([t]), out, var_type="learned_range").log_variance
        np.testing.assert_allclose(np.ravel(got), want, rtol=1e-5)


def test_simple_loss():
    s = D.make_schedule("cosine", T)
    x0, noise, out = _rand(7), _rand(8), _rand(9)
    t = np.array([10, 900])
    for pred in D.PREDICTIONS:
        target = np.asarray(D.training_target(s, _j(x0), t, _j(noise), pred))
        got = D.simple_loss(s, _j(x0), t, _j(noise), _j(out), prediction=pred)
        assert got.shape == (2,)
        np.testing.assert_allclose(got, ((out - target) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(D.simple_loss(s, _j(x0), t, _j(noise), _j(noise)), 0.0)


# ---------------------------------------------------------------------------------- single steps


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(monkeypatch, pred, var_type, clip):
    ref = _upcast(
        DDPMScheduler(
            num_train_timesteps=T,
            beta_schedule="linear",
            variance_type=var_type,
            prediction_type=OURS_TO_DIFFUSERS_PRED[pred],
            clip_sample=clip,
        )
    )
    ours = _ours_from(ref)
    x, out, noise = _rand(10, scale=1.5), _rand(11), _rand(12)
    var_out = np.random.default_rng(13).uniform(-1, 1, SHAPE)
    full_out = np.concatenate([out, var_out], -1) if var_type == "learned_range" else out
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: _t(noise))
    for t in (0, 1, 40, 500, 999):
        want = _np(ref.step(_t(full_out), t, _t(x)).prev_sample)
        kw = dict(prediction=pred, var_type=var_type, clip_x0=clip)
        got = D.ddpm_step(ours, _j(x), t, _j(full_out), noise=_j(noise), **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"t={t}")
        # The mean alone (zero noise) as well, so a variance error cannot hide a mean error.
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: torch.zeros_like(_t(noise)))
        want_mean = _np(ref.step(_t(full_out), t, _t(x)).prev_sample)
        got_mean = D.ddpm_step(ours, _j(x), t, _j(full_out), noise=_j(np.zeros(SHAPE)), **kw)
        np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5, atol=2e-5, err_msg=f"t={t}")
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: _t(noise))


def test_ddpm_step_respaced_matches_diffusers(monkeypatch):
    ref = _upcast(DDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False))
    ref.set_timesteps(25)
    ours = D.respace(_ours_from(ref), D.space_timesteps(T, "ddim25"))
    x, out, noise = _rand(14), _rand(15), _rand(16)
    full_out = np.concatenate([out, np.random.default_rng(17).uniform(-1, 1, SHAPE)], -1)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: _t(noise))
    for i in (24, 10, 1, 0):
        t = int(ours.timesteps[i])
        want = _np(ref.step(_t(full_out), t, _t(x)).prev_sample)
        got = D.ddpm_step(ours, _j(x), i, _j(full_out), noise=_j(noise), var_type="learned_range")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"i={i}")


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
def test_ddim_step_matches_diffusers(pred, eta):
    ref = _upcast(
        DDIMScheduler(
            num_train_timesteps=T,
            beta_schedule="linear",
            clip_sample=False,
            set_alpha_to_one=True,
            prediction_type=OURS_TO_DIFFUSERS_PRED[pred],
            timestep_spacing="leading",
        )
    )
    ref.set_timesteps(50)
    ours = D.respace(_ours_from(ref), D.space_timesteps(T, "ddim50"))
    np.testing.assert_array_equal(ours.timesteps[::-1], ref.timesteps.numpy())
    x, out, noise = _rand(20), _rand(21), _rand(22)
    for i in (49, 30, 1, 0):
        t = int(ours.timesteps[i])
        want = _np(ref.step(_t(out), t, _t(x), eta=eta, variance_noise=_t(noise)).prev_sample)
        got = D.ddim_step(ours, _j(x), i, _j(out), eta=eta, noise=_j(noise), prediction=pred)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"i={i}")
        # Per-example step indices give the same result as a scalar index.
        got_b = D.ddim_step(ours, _j(x), jnp.array([i, i]), _j(out), eta=eta, noise=_j(noise), prediction=pred)
        np.testing.assert_allclose(got_b, got, rtol=1e-6, atol=1e-6)


def test_ddim_step_clipped_matches_diffusers_use_clipped_model_output():
    # Our clip_x0 recomputes eps from the clipped x0: diffusers' use_clipped_model_output=True.
    ref = _upcast(DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True))
    ref.set_timesteps(20)
    ours = D.respace(_ours_from(ref), D.space_timesteps(T, "ddim20"))
    x, out, noise = _rand(23), _rand(24, scale=3.0), _rand(25)
    for i in (19, 5, 0):
        t = int(ours.timesteps[i])
        want = ref.step(_t(out), t, _t(x), eta=0.5, variance_noise=_t(noise), use_clipped_model_output=True)
        got = D.ddim_step(ours, _j(x), i, _j(out), eta=0.5, noise=_j(noise), clip_x0=True)
        np.testing.assert_allclose(got, _np(want.prev_sample), rtol=1e-5, atol=2e-5, err_msg=f"i={i}")


def test_ddim_learned_range_variance():
    s = D.respace(D.make_schedule("linear", T), D.space_timesteps(T, 10))
    x, eps, noise = _j(_rand(26)), _j(_rand(27)), _j(_rand(28))
    i = 5
    # v = -1 selects the posterior variance, which is DDIM's own sigma^2 at eta = 1.
    out = jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
    got = D.ddim_step(s, x, i, out, eta=1.0, noise=noise, var_type="learned_range")
    want = D.ddim_step(s, x, i, eps, eta=1.0, noise=noise)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # v = +1 selects beta; eta scales the standard deviation linearly.
    out = jnp.concatenate([eps, jnp.ones_like(eps)], -1)
    eta = 0.5
    x0 = D.predict_x0_from_eps(s, x, i, eps)
    var = eta**2 * s.betas[i]
    acp_prev = s.alphas_cumprod_prev[i]
    expect = np.sqrt(acp_prev) * x0 + np.sqrt(1 - acp_prev - var) * eps + np.sqrt(var) * noise
    got = D.ddim_step(s, x, i, out, eta=eta, noise=noise, var_type="learned_range")
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    # A traced eta (jit argument) takes the jnp path and must agree with the float64-host path.
    traced = jax.jit(lambda e: D.ddim_step(s, x, i, eps, eta=e, noise=noise))(0.7)
    np.testing.assert_allclose(traced, D.ddim_step(s, x, i, eps, eta=0.7, noise=noise), rtol=1e-5, atol=1e-5)
    # No noise at step 0 whatever the model says.
    got0 = D.ddim_step(s, x, 0, out, eta=1.0, noise=noise, var_type="learned_range")
    np.testing.assert_allclose(got0, D.predict_x0_from_eps(s, x, 0, eps), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ full samplers


def _toy_denoiser(x, t, cond):
    assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
    return 0.1 * x + jnp.sin(t.astype(x.dtype) / 7.0)[:, None, None, None]


@pytest.fixture(scope="module")
def small_sched():
    return D.make_schedule("linear", 50, beta_end=0.2)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_equals_ddpm(small_sched, clip):
    key = jax.random.PRNGKey(3)
    shape = (2, 4, 4, 3)
    ddpm = jax.jit(lambda k: D.ddpm_sample(_toy_denoiser, small_sched, k, shape, clip_x0=clip))
    ddim = jax.jit(lambda k: D.ddim_sample(_toy_denoiser, small_sched, k, shape, eta=1.0, clip_x0=clip))
    a, b = ddpm(key), ddim(key)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-5, atol=1e-5)
    assert int(a.nfe) == int(b.nfe) == 50
    # The comparison is not vacuous: another key gives a different sample.
    assert float(jnp.max(jnp.abs(ddpm(jax.random.PRNGKey(4)).samples - a.samples))) > 0.1


def test_sampler_key_derivation(small_sched):
    shape = (2, 4, 4, 3)
    k1, k2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    run = lambda k, **kw: D.ddim_sample(_toy_denoiser, small_sched, k, shape, **kw).samples  # noqa: E731
    np.testing.assert_array_equal(run(k1), run(k1))
    x_T = jax.random.normal(D.split_sample_key(k1)[0], shape)
    # eta=0: the key matters only through x_T.
    np.testing.assert_array_equal(run(k1), run(k2, x_init=x_T))
    # eta>0: the remaining key part drives the per-step noise.
    assert float(jnp.max(jnp.abs(run(k1, eta=1.0) - run(k2, eta=1.0, x_init=x_T)))) > 1e-2
    # New-style typed keys work too.
    typed = D.ddim_sample(_toy_denoiser, small_sched, jax.random.key(0), shape)
    assert typed.samples.shape == shape


@pytest.mark.parametrize("spec", [None, 10, "ddim20", [0, 5, 17, 30, 49]])
def test_nfe_counts_steps(small_sched, spec):
    s = small_sched if spec is None else D.respace(small_sched, D.space_timesteps(50, spec))
    runtime_calls = []

    def f(x, t, cond):
        assert cond is None
        # Counts executions, not traces: the loop body is traced once but runs num_steps times.
        jax.debug.callback(lambda: runtime_calls.append(1))
        return _toy_denoiser(x, t, cond)

    for name in D.SAMPLERS:
        runtime_calls.clear()
        res = D.sample(name, f, s, jax.random.PRNGKey(0), (1, 2, 2, 1))
        jax.block_until_ready(res)
        jax.effects_barrier()
        assert res.nfe.dtype == jnp.int32 and res.nfe.shape == ()
        assert int(res.nfe) == s.num_steps == len(runtime_calls)


def test_ddpm_sample_matches_manual_loop(small_sched):
    # Pins the documented randomness: x_T from split(key)[0], step-i noise from
    # fold_in(split(key)[1], i), steps visited from the last index down, model fed original t.
    s = D.respace(small_sched, [0, 20, 49])
    key, shape = jax.random.PRNGKey(11), (2, 3, 3, 2)
    init_key, noise_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape)
    for i in (2, 1, 0):
        t_model = jnp.full((2,), int(s.timesteps[i]), jnp.int32)
        z = jax.random.normal(jax.random.fold_in(noise_key, i), shape)
        x = D.ddpm_step(s, x, i, _toy_denoiser(x, t_model, None), noise=z, var_type="fixed_large", clip_x0=True)
    res = D.ddpm_sample(_toy_denoiser, s, key, shape, var_type="fixed_large")
    np.testing.assert_allclose(res.samples, x, rtol=1e-6, atol=1e-6)


def test_cond_is_passed_through(small_sched):
    cond = {"label": jnp.array([1.0, -1.0])}
    seen = []

    def f(x, t, c):
        seen.append(c)
        return 0.1 * x + c["label"][:, None, None, None]

    res = D.ddim_sample(f, small_sched, jax.random.PRNGKey(0), (2, 2, 2, 1), cond=cond)
    assert seen and all(set(c.keys()) == {"label"} for c in seen)
    assert res.samples.shape == (2, 2, 2, 1)


@pytest.mark.parametrize("spec", [10, "ddim20"])
def test_point_mass_ddim_recovers_point(spec):
    full = D.make_schedule("linear", T)
    s = D.respace(full, D.space_timesteps(T, spec))
    x_star = jnp.asarray(np.random.default_rng(30).uniform(-0.9, 0.9, (1, 4, 4, 3)), jnp.float32)
    sqrt_acp = jnp.asarray(full.sqrt_alphas_cumprod, jnp.float32)
    sqrt_1m = jnp.asarray(full.sqrt_one_minus_alphas_cumprod, jnp.float32)

    def exact_eps(x, t, cond):
        # The true eps for data concentrated at x*, indexed by the ORIGINAL timestep.
        return (x - sqrt_acp[t][:, None, None, None] * x_star) / sqrt_1m[t][:, None, None, None]

    shape = (3, 4, 4, 3)
    res = jax.jit(lambda k: D.ddim_sample(exact_eps, s, k, shape, eta=0.0, clip_x0=False))(jax.random.PRNGKey(5))
    np.testing.assert_allclose(res.samples, jnp.broadcast_to(x_star, shape), atol=1e-4)
    # Ancestral sampling also lands exactly on x* since the final step returns the predicted x0.
    res = D.ddpm_sample(exact_eps, s, jax.random.PRNGKey(6), shape, clip_x0=False)
    np.testing.assert_allclose(res.samples, jnp.broadcast_to(x_star, shape), atol=1e-4)


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_helpful_errors(small_sched):
    s = small_sched
    x = jnp.zeros((1, 2, 2, 3))
    t = jnp.array([1])
    cases = [
        (lambda: D.get_betas("quadratic", 10), "linear"),
        (lambda: D.make_schedule("linear", 0), "positive"),
        (lambda: D.space_timesteps(10, 11), r"\[1, 10\]"),
        (lambda: D.space_timesteps(10, 0), r"\[1, 10\]"),
        (lambda: D.space_timesteps(10, "ddimx"), "ddimN"),
        (lambda: D.space_timesteps(10, "ddim11"), "N=11"),
        (lambda: D.space_timesteps(10, [3, 10]), "out-of-range"),
        (lambda: D.space_timesteps(10, "1,b"), "comma-separated"),
        (lambda: D.space_timesteps(10, []), "empty"),
        (lambda: D.space_timesteps(10, 2.5), "expected an int"),
        (lambda: D.respace(s, [0, 50]), r"\[0, 49\]"),
        (lambda: D.Schedule.from_betas([0.1, 1.5]), r"\(0, 1\]"),
        (lambda: D.interpret_output(s, x, t, x, prediction="epsilon"), "eps, x0, v"),
        (lambda: D.interpret_output(s, x, t, x, var_type="learned"), "fixed_small"),
        (lambda: D.interpret_output(s, x, t, x, var_type="learned_range"), "2C=6"),
        (lambda: D.interpret_output(s, x, t, jnp.zeros((1, 2, 2, 6))), "does not match"),
        (lambda: D.training_target(s, x, t, x, "sample"), "valid values"),
        (lambda: D.simple_loss(s, x, t, x, jnp.zeros((1, 2, 2, 6))), "first C channels"),
        (lambda: D.ddim_step(s, x, 3, x, eta=1.0, noise=None), "noise"),
        (lambda: D.sample("euler", _toy_denoiser, s, jax.random.PRNGKey(0), (1, 2, 2, 3)), "ddpm, ddim"),
        (lambda: D.ddpm_sample(_toy_denoiser, s, jax.random.PRNGKey(0), (1, 2, 2, 3), var_type="big"), "fixed_large"),
        (lambda: D.ddim_sample(_toy_denoiser, s, jax.random.PRNGKey(0), (1, 2, 2, 3), prediction="e"), "eps"),
        (lambda: D.ddim_sample(_toy_denoiser, s, jax.random.PRNGKey(0), (1, 2, 2, 1), x_init=x), "x_init"),
    ]
    for k, (fn, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            fn()
            pytest.fail(f"case {k} ({match!r}) did not raise")


def test_module_imports_no_flax_or_models():
    code = (
        "import sys, research.diffusion as d; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'flax' or m.startswith('research.models')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
