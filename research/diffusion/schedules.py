"""Noise schedules for discrete-time Gaussian diffusion.

Everything here is float64 numpy: the schedule is a handful of length-S tables that are built once on
the host and then closed over by jitted code as constants. Computing the tables in float64 and only
casting the final per-step coefficients to the model dtype avoids the precision loss of taking
cumulative products of ~1000 float32 factors (alphas_cumprod near t=T is ~1e-5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid")


def _cosine_alpha_bar(u: np.ndarray, s: float) -> np.ndarray:
    # The small offset s keeps beta_0 from being vanishingly small (Nichol & Dhariwal 2021, eq. 17).
    return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2


def get_betas(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Per-step noise variances beta_t, t = 0..T-1, as a float64 array of length T.

    'linear' (DDPM), 'scaled_linear' (Stable Diffusion: linear in sqrt(beta)), 'cosine' /
    'squaredcos_cap_v2' (iDDPM; beta_start/beta_end are ignored, capped at max_beta) and 'sigmoid'
    (GeoDiff).
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    T = int(num_timesteps)
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name in ("cosine", "squaredcos_cap_v2"):
        u = np.arange(T + 1, dtype=np.float64) / T
        abar = _cosine_alpha_bar(u, cosine_s)
        # Capping matters only at the very end, where abar(1) = 0 would make beta exactly 1 and the
        # reverse process singular.
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    elif name == "sigmoid":
        x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        betas = 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"Unknown beta schedule {name!r}; valid names: {', '.join(BETA_SCHEDULES)}")
    return betas.astype(np.float64)


def _frozen(a: np.ndarray, dtype=np.float64) -> np.ndarray:
    a = np.array(a, dtype=dtype, copy=True)
    # The tables are baked into traced programs as constants, so silent in-place edits after a jit
    # trace would desynchronise host and device; make them read-only instead.
    a.setflags(write=False)
    return a


# eq=False gives identity hashing/equality: numpy array fields make the generated __eq__/__hash__
# unusable, and identity semantics are what jit wants for a static closure constant.
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Discrete diffusion schedule with S steps (S = T for a full schedule, fewer if respaced).

    All arrays are read-only float64 of length S, indexed by the *step index* i in [0, S).
    `timesteps[i]` is the original training timestep of step i; models are always conditioned on it.
    """

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def fixed_large_log_variance(self) -> np.ndarray:
        """log of DDPM's sigma_t^2 = beta_t, with step 0 set to the posterior variance of step 1.

        Following DDPM/iDDPM: log(beta_0) is tiny and would dominate the t=0 decoder NLL, while the
        sampler never adds noise at step 0 anyway, so the value only matters for likelihoods.
        """
        if self.num_steps == 1:
            return np.log(self.betas)
        return np.log(np.concatenate([self.posterior_variance[1:2], self.betas[1:]]))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray, timesteps=None) -> "Schedule":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        S = betas.shape[0]
        if timesteps is None:
            timesteps = np.arange(S, dtype=np.int64)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        if timesteps.shape != (S,):
            raise ValueError(f"timesteps must have shape ({S},), got {timesteps.shape}")
        if S > 1 and not np.all(np.diff(timesteps) > 0):
            raise ValueError("timesteps must be strictly increasing")

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.concatenate([[1.0], acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # posterior_variance[0] is exactly 0 (x_0 is determined given x_1 and x_0), so its log is
        # -inf; DDPM/iDDPM substitute step 1's value. With a single step there is no step 1, and
        # beta_0 is the only finite scale available.
        if S > 1:
            post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
        else:
            post_log_var = np.log(betas)
        return cls(
            betas=_frozen(betas),
            alphas=_frozen(alphas),
            alphas_cumprod=_frozen(acp),
            alphas_cumprod_prev=_frozen(acp_prev),
            sqrt_alphas_cumprod=_frozen(np.sqrt(acp)),
            sqrt_one_minus_alphas_cumprod=_frozen(np.sqrt(1.0 - acp)),
            sqrt_recip_alphas_cumprod=_frozen(np.sqrt(1.0 / acp)),
            sqrt_recipm1_alphas_cumprod=_frozen(np.sqrt(1.0 / acp - 1.0)),
            posterior_variance=_frozen(post_var),
            posterior_log_variance_clipped=_frozen(post_log_var),
            posterior_mean_coef1=_frozen(betas * np.sqrt(acp_prev) / (1.0 - acp)),
            posterior_mean_coef2=_frozen((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
            timesteps=_frozen(timesteps, np.int64),
        )

    def __repr__(self) -> str:
        ts = self.timesteps
        return f"Schedule(num_steps={self.num_steps}, timesteps=[{ts[0]}..{ts[-1]}])"


def make_schedule(name: str, num_timesteps: int, **kw) -> Schedule:
    """Full (un-respaced) schedule; keyword arguments go to `get_betas`."""
    return Schedule.from_betas(get_betas(name, num_timesteps, **kw))


def space_timesteps(num_timesteps: int, spec) -> list[int]:
    """Choose which of T training timesteps to keep, as a sorted list of unique indices.

    spec:
      * int n: n indices evenly spaced over [0, T-1], both ends included.
      * 'ddimN': DDIM's stride spacing i * (T // N) for i < N, which is diffusers' 'leading'
        spacing (T=1000, N=50 -> 0, 20, ..., 980). When N divides T this is range(0, T, T // N);
        otherwise that range would have more than N entries, so we keep the first N, as diffusers does.
      * '10,20,30' or a list/tuple of ints: exactly those indices.

    Note the comma string means explicit indices here, not iDDPM's per-section step counts.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    T = int(num_timesteps)

    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        n = int(spec)
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        return sorted(set(int(v) for v in np.round(np.linspace(0, T - 1, n))))

    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("ddim"):
            try:
                n = int(s[4:])
            except ValueError:
                raise ValueError(f"bad spacing {spec!r}: expected 'ddimN' with integer N, e.g. 'ddim50'") from None
            if not 1 <= n <= T:
                raise ValueError(f"'ddimN' needs 1 <= N <= {T}, got N={n}")
            stride = T // n
            return [i * stride for i in range(n)]
        try:
            indices = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(
                f"bad spacing {spec!r}: expected an int, 'ddimN', or comma-separated timestep indices"
            ) from None
    elif isinstance(spec, (list, tuple, np.ndarray)):
        indices = list(spec)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in indices):
            raise ValueError(f"explicit timesteps must be ints, got {spec!r}")
        indices = [int(v) for v in indices]
    else:
        raise ValueError(f"bad spacing {spec!r}: expected an int, 'ddimN', comma-separated indices, or a list of ints")

    if not indices:
        raise ValueError("explicit timestep list is empty")
    bad = [v for v in indices if not 0 <= v < T]
    if bad:
        raise ValueError(f"timestep indices must be in [0, {T - 1}], got out-of-range {bad}")
    return sorted(set(indices))


def respace(schedule: Schedule, use_timesteps) -> Schedule:
    """Sub-sample `schedule` to the given step indices, keeping the marginals q(x_t | x_0) fixed.

    Betas are recomputed from the kept alphas_cumprod so that the posterior (and a learned variance
    interpolating between posterior variance and beta) refer to the jumps of the new chain.
    `use_timesteps` indexes the steps of `schedule` (original timesteps for a full schedule); the
    result's `timesteps` are the corresponding original training timesteps.
    """
    use = np.asarray(sorted(set(int(v) for v in use_timesteps)), dtype=np.int64)
    if use.size == 0:
        raise ValueError("respace needs at least one timestep")
    if use[0] < 0 or use[-1] >= schedule.num_steps:
        raise ValueError(f"respace indices must be in [0, {schedule.num_steps - 1}], got {use.tolist()}")
    acp = schedule.alphas_cumprod[use]
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    return Schedule.from_betas(1.0 - acp / acp_prev, timesteps=schedule.timesteps[use])
