"""research.diffusion.guidance: classifier-free guidance over the denoiser contract, against the closed-form
combination of two separate forwards, diffusers' rescale_noise_cfg, DiT's three-channel variant, and a DDIM run on
an analytic model whose guided sample is known exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from research import diffusion as D
from research.cond import Cond
from research.diffusion.guidance import guided_denoiser, null_like, scale_from_w, w_from_scale

B, H, W, C = 4, 5, 5, 4
K = 3  # classes; label K is the null class
L, E = 6, 8  # text tokens, text width

_rng = np.random.default_rng(0)
EMB = jnp.asarray(_rng.normal(size=(K + 1, C)), jnp.float32)
PROJ = jnp.asarray(_rng.normal(size=(E, C)) / np.sqrt(E), jnp.float32)
MIX = jnp.asarray(_rng.normal(size=(C, 2 * C)) / np.sqrt(C), jnp.float32)


def toy_model(x, t, cond, out_channels=C):
    """A nonlinear function of (x [B,H,W,C], t [B], cond) that depends on every cond field it is given."""
    if isinstance(cond, dict):
        label, text = cond["label"], cond.get("text")
    else:
        label, text = cond.label, cond.text
    h = EMB[label]
    if text is not None:
        h = h + jnp.tanh(text.mean(axis=1) @ PROJ)
    tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    z = jnp.tanh(x + h[:, None, None, :]) * (1.0 + tt) + 0.3 * x**2
    return (z @ MIX)[..., :out_channels]


def _inputs(seed=1):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(B, H, W, C)), jnp.float32)
    label = jnp.asarray(r.integers(0, K, size=(B,)), jnp.int32)
    text = jnp.asarray(r.normal(size=(B, L, E)), jnp.float32)
    return x, label, text


def _schedule():
    full = D.make_schedule("cosine", 1000)
    return full, D.respace(full, D.space_timesteps(1000, 20))


def test_scale_and_w_conventions():
    assert scale_from_w(0.0) == 1.0 and w_from_scale(1.0) == 0.0
    assert scale_from_w(3.0) == 4.0 and w_from_scale(4.0) == 3.0
    # diffusers' form u + s (c - u) equals Ho & Salimans' (1 + w) c - w u at s = 1 + w.
    c, u, w = 0.7, -0.2, 2.5
    assert np.isclose(u + scale_from_w(w) * (c - u), (1 + w) * c - w * u)


def test_scale_one_is_exactly_the_conditional_model():
    x, label, _ = _inputs()
    cond = Cond(label=label)
    t = jnp.full((B,), 500, jnp.int32)
    want = toy_model(x, t, cond)
    for pred in ("eps", "v", "x0"):
        f = guided_denoiser(toy_model, null_like(cond, K), scale=1, prediction=pred, schedule=None, channels=C)
        np.testing.assert_array_equal(np.asarray(f(x, t, cond)), np.asarray(want))
    # A traced scale of 1 goes through the batched forward; c + 0 (c - u) is still its conditional half to the bit.
    null = null_like(cond, K)
    g = jax.jit(
        lambda s: guided_denoiser(toy_model, null, scale=s, prediction="eps", schedule=None, channels=C)(x, t, cond)
    )
    both = Cond(label=jnp.concatenate([cond.label, null.label]))
    half = jax.jit(lambda: toy_model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)[:B])()
    np.testing.assert_array_equal(np.asarray(g(jnp.float32(1.0))), np.asarray(half))
    np.testing.assert_allclose(np.asarray(half), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["struct", "dict"])
def test_batched_forward_equals_two_forwards(kind):
    x, label, text = _inputs()
    if kind == "struct":
        cond = Cond(label=label, text=text)
        null = Cond(label=jnp.full((B,), K, jnp.int32), text=jnp.zeros_like(text))
    else:
        cond = {"label": label, "text": text}
        null = {"label": jnp.full((B,), K, jnp.int32), "text": jnp.zeros_like(text)}
    t = jnp.asarray([10, 200, 600, 999], jnp.int32)
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return toy_model(x, t, cond)

    s = 4.0
    out = guided_denoiser(model, null, scale=s, prediction="eps", schedule=None, channels=C)(x, t, cond)
    assert calls == [2 * B]  # one forward of the doubled batch
    c, u = toy_model(x, t, cond), toy_model(x, t, null)
    np.testing.assert_allclose(np.asarray(out), np.asarray(u + s * (c - u)), rtol=1e-6, atol=1e-5)
    assert float(jnp.max(jnp.abs(c - u))) > 0.1  # the condition matters, so the check has teeth


def _to_eps(schedule, x, i, out, prediction):
    if prediction == "eps":
        return out
    if prediction == "v":
        return D.predict_eps_from_v(schedule, x, i, out)
    return D.predict_eps_from_x0(schedule, x, i, out)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guidance_is_the_eps_formula_for_every_parameterisation(prediction):
    _, sched = _schedule()
    x, label, _ = _inputs(2)
    cond = Cond(label=label)
    null = null_like(cond, K)
    i = jnp.asarray([2, 7, 12, 17], jnp.int32)  # step indices of the respaced schedule
    t = jnp.asarray(sched.timesteps, jnp.int32)[i]
    w = 2.0
    out = guided_denoiser(toy_model, null, scale=scale_from_w(w), prediction=prediction, schedule=sched, channels=C)(
        x, t, cond
    )
    oc, ou = toy_model(x, t, cond), toy_model(x, t, null)
    eps_c, eps_u = _to_eps(sched, x, i, oc, prediction), _to_eps(sched, x, i, ou, prediction)
    want_eps = (1 + w) * eps_c - w * eps_u
    got_eps = _to_eps(sched, x, i, out, prediction)
    np.testing.assert_allclose(np.asarray(got_eps), np.asarray(want_eps), rtol=1e-5, atol=2e-5)
    # The conversions are affine with coefficients shared by both branches, so guiding the raw output is the same.
    np.testing.assert_allclose(np.asarray(out), np.asarray((1 + w) * oc - w * ou), rtol=1e-5, atol=2e-5)


def test_rescale_matches_diffusers_for_eps():
    x, label, text = _inputs(3)
    cond = Cond(label=label, text=text)
    null = Cond(label=jnp.full((B,), K, jnp.int32), text=jnp.zeros_like(text))
    t = jnp.asarray([50, 300, 700, 950], jnp.int32)
    s, r = 7.5, 0.7
    out = guided_denoiser(toy_model, null, scale=s, prediction="eps", schedule=None, channels=C, rescale=r)(x, t, cond)
    c = torch.from_numpy(np.asarray(toy_model(x, t, cond), np.float64))
    u = torch.from_numpy(np.asarray(toy_model(x, t, null), np.float64))
    # diffusers' layout is NCHW; the per-example std over all non-batch entries does not care.
    want = rescale_noise_cfg((u + s * (c - u)).permute(0, 3, 1, 2), c.permute(0, 3, 1, 2), guidance_rescale=r)
    want = want.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-6 * max(1.0, np.abs(want).max()))
    plain = u + s * (c - u)
    assert np.abs(plain.numpy() - want).max() > 1e-2  # rescale changed the output


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_rescale_through_eps_on_a_respaced_schedule(prediction):
    """Reference in float64 from the FULL schedule's alphas_cumprod at the original timesteps: this checks that
    the wrapper maps t_model to the right step of the respaced schedule."""
    full, sched = _schedule()
    x, label, _ = _inputs(4)
    cond = Cond(label=label)
    null = null_like(cond, K)
    t = jnp.asarray(sched.timesteps[[1, 6, 11, 16]], jnp.int32)
    s, r = 5.0, 0.6
    out = guided_denoiser(toy_model, null, scale=s, prediction=prediction, schedule=sched, channels=C, rescale=r)(
        x, t, cond
    )
    abar = full.alphas_cumprod[np.asarray(t)][:, None, None, None]
    a, sg = np.sqrt(abar), np.sqrt(1 - abar)
    xn = np.asarray(x, np.float64)
    oc, ou = np.asarray(toy_model(x, t, cond), np.float64), np.asarray(toy_model(x, t, null), np.float64)
    if prediction == "v":
        to_eps, from_eps = (lambda o: a * o + sg * xn), (lambda e: (e - sg * xn) / a)
    else:
        to_eps, from_eps = (lambda o: (xn - a * o) / sg), (lambda e: (xn - sg * e) / a)
    eps_c, eps_u = to_eps(oc), to_eps(ou)
    eps_g = rescale_noise_cfg(
        torch.from_numpy(eps_u + s * (eps_c - eps_u)), torch.from_numpy(eps_c), guidance_rescale=r
    ).numpy()
    want = from_eps(eps_g)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    # The rescale moves the output far beyond the tolerance, so abar read at the wrong step cannot pass.
    assert np.abs(want - from_eps(eps_u + s * (eps_c - eps_u))).max() > 1e-2


def test_learned_variance_comes_from_the_conditional_branch_and_guide_channels():
    x, label, _ = _inputs(5)
    cond = Cond(label=label)
    null = null_like(cond, K)
    t = jnp.asarray([100, 400, 700, 900], jnp.int32)

    def model(x, t, cond):
        return toy_model(x, t, cond, out_channels=2 * C)

    s = 4.0
    oc, ou = np.asarray(model(x, t, cond)), np.asarray(model(x, t, null))
    out = np.asarray(guided_denoiser(model, null, scale=s, prediction="eps", schedule=None, channels=C)(x, t, cond))
    assert out.shape == (B, H, W, 2 * C)
    np.testing.assert_array_equal(out[..., C:], oc[..., C:])
    np.testing.assert_allclose(out[..., :C], ou[..., :C] + s * (oc[..., :C] - ou[..., :C]), rtol=1e-6, atol=1e-5)

    # DiT's forward_with_cfg: guide eps[:, :3], everything else (4th eps channel, sigma) from the conditional half.
    dit = oc.copy()
    dit[..., :3] = ou[..., :3] + s * (oc[..., :3] - ou[..., :3])
    out3 = np.asarray(
        guided_denoiser(model, null, scale=s, prediction="eps", schedule=None, channels=C, guide_channels=3)(x, t, cond)
    )
    np.testing.assert_allclose(out3, dit, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(out3[..., 3:], oc[..., 3:])
    assert np.abs(oc[..., 3] - ou[..., 3]).max() > 0.1  # channel 3 would have changed had it been guided


def test_interval_outside_returns_the_conditional_output():
    x, label, _ = _inputs(6)
    cond = Cond(label=label)
    null = null_like(cond, K)
    t = jnp.asarray([100, 300, 700, 900], jnp.int32)
    s = 3.0
    out = np.asarray(
        guided_denoiser(toy_model, null, scale=s, prediction="eps", schedule=None, channels=C, interval=(300, 700))(
            x, t, cond
        )
    )
    oc, ou = np.asarray(toy_model(x, t, cond)), np.asarray(toy_model(x, t, null))
    np.testing.assert_array_equal(out[[0, 3]], oc[[0, 3]])
    np.testing.assert_allclose(out[[1, 2]], (ou + s * (oc - ou))[[1, 2]], rtol=1e-6, atol=1e-5)
    assert np.abs(out[[1, 2]] - oc[[1, 2]]).max() > 0.1


def _conv_model(x, t, cond):
    """Three 3x3 convolutions, C -> 32 -> 32 -> C, with a label embedding: FLOPs dominated by the convs."""
    r = np.random.default_rng(7)
    ws = [jnp.asarray(r.normal(size=(3, 3, ci, co)) * 0.1, jnp.float32) for ci, co in ((C, 32), (32, 32), (32, C))]
    h = x + EMB[cond.label][:, None, None, :] + (t.astype(jnp.float32) / 1000)[:, None, None, None]
    for i, w in enumerate(ws):
        h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if i < 2:
            h = jax.nn.silu(h)
    return h


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def test_guided_call_costs_about_two_forwards():
    x = jnp.zeros((B, 16, 16, C), jnp.float32)
    t = jnp.full((B,), 500, jnp.int32)
    cond = Cond(label=jnp.zeros((B,), jnp.int32))
    base = _flops(_conv_model, x, t, cond)
    guided = guided_denoiser(
        _conv_model, null_like(cond, K), scale=4.0, prediction="eps", schedule=None, channels=C, rescale=0.7
    )
    ratio = _flops(guided, x, t, cond) / base
    assert 1.8 <= ratio <= 2.3, ratio


def test_ddim_with_guidance_one_batched_forward_per_step():
    """Point-mass data per class: eps(x, t, y) = (x - sqrt(abar_t) mu_y) / sqrt(1 - abar_t). The guided eps is the
    point-mass eps of mu_c + w (mu_c - mu_null), which deterministic DDIM reproduces exactly."""
    full, sched = _schedule()
    r = np.random.default_rng(8)
    mus = jnp.asarray(r.normal(size=(K + 1, C)) * 0.3, jnp.float32)
    sab = jnp.asarray(full.sqrt_alphas_cumprod, jnp.float32)
    s1m = jnp.asarray(full.sqrt_one_minus_alphas_cumprod, jnp.float32)
    batches = []

    def model(x, t, cond):
        batches.append(x.shape[0])
        mu = mus[cond.label][:, None, None, :]
        return (x - sab[t][:, None, None, None] * mu) / s1m[t][:, None, None, None]

    label = jnp.asarray([0, 1, 2, 0], jnp.int32)
    cond = Cond(label=label)
    s = 3.0
    guided = guided_denoiser(model, null_like(cond, K), scale=s, prediction="eps", schedule=sched, channels=C)
    res = jax.jit(lambda key: D.ddim_sample(guided, sched, key, (B, H, W, C), cond=cond, clip_x0=False))(
        jax.random.PRNGKey(0)
    )
    assert int(res.nfe) == sched.num_steps == 20
    assert batches == [2 * B]  # the loop body holds a single forward, of the doubled batch
    mu_g = mus[label] + (s - 1) * (mus[label] - mus[K])
    want = np.broadcast_to(np.asarray(mu_g)[:, None, None, :], (B, H, W, C))
    np.testing.assert_allclose(np.asarray(res.samples), want, atol=1e-4)
    assert float(jnp.abs(mu_g - mus[label]).max()) > 0.1


def test_null_like_and_errors():
    x, label, text = _inputs(9)
    cond = Cond(label=label, text=text)
    null = null_like(cond, K)
    np.testing.assert_array_equal(np.asarray(null.label), np.full((B,), K))
    assert null.text is text
    assert null_like({"label": label}, K)["label"].tolist() == [K] * B
    with pytest.raises(ValueError, match="label"):
        null_like(Cond(text=text), K)

    _, sched = _schedule()
    with pytest.raises(ValueError, match="structure"):
        guided_denoiser(toy_model, Cond(label=label), scale=2.0, prediction="eps", schedule=None, channels=C)(
            x, jnp.full((B,), 5, jnp.int32), cond
        )
    with pytest.raises(ValueError, match="not timesteps of the schedule"):
        guided_denoiser(toy_model, null, scale=2.0, prediction="v", schedule=sched, channels=C, rescale=0.5)(
            x, jnp.full((B,), 1, jnp.int32), cond
        )
    with pytest.raises(ValueError, match="needs the sampler's schedule"):
        guided_denoiser(toy_model, null, scale=2.0, prediction="v", schedule=None, channels=C, rescale=0.5)
    with pytest.raises(ValueError, match="guide_channels"):
        guided_denoiser(toy_model, null, scale=2.0, prediction="eps", schedule=None, channels=C, guide_channels=5)
    with pytest.raises(ValueError, match="unknown prediction"):
        guided_denoiser(toy_model, null, scale=2.0, prediction="score", schedule=None, channels=C)
