"""What every sampler shares: the result type, the denoiser signature and the key split that draws x_T.

Kept apart from samplers.py so that samplers' `sample` dispatcher can import the ODE solvers (solvers.py) while
the solvers use these same definitions without an import cycle.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


class SampleResult(NamedTuple):
    samples: jnp.ndarray
    nfe: jnp.ndarray  # int32 scalar: number of denoise_fn calls actually made in the loop


def split_sample_key(key):
    """(init_key, noise_key) used by every sampler; exposed so callers can reproduce x_T."""
    init_key, noise_key = jax.random.split(key)
    return init_key, noise_key


__all__ = ["DenoiseFn", "SampleResult", "split_sample_key"]
