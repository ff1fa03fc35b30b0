"""Model-agnostic diffusion math: schedules, Gaussian forward/posterior algebra, samplers.

Depends only on numpy and jax.numpy (never flax or research.models), so any denoiser that maps
(x_t [B, H, W, C], t [B] int32, cond) -> output can be trained and sampled with it.
"""

from research.diffusion.gaussian import (
    PREDICTIONS,
    VAR_TYPES,
    ModelPrediction,
    extract,
    interpret_output,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_v,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior,
    q_sample,
    simple_loss,
    training_target,
)
from research.diffusion.samplers import (
    SAMPLERS,
    SampleResult,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    sample,
    split_sample_key,
    step_noise,
)
from research.diffusion.schedules import (
    BETA_SCHEDULES,
    Schedule,
    get_betas,
    make_schedule,
    respace,
    space_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "SAMPLERS",
    "VAR_TYPES",
    "ModelPrediction",
    "SampleResult",
    "Schedule",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "extract",
    "get_betas",
    "interpret_output",
    "make_schedule",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_posterior",
    "q_sample",
    "respace",
    "sample",
    "simple_loss",
    "space_timesteps",
    "split_sample_key",
    "step_noise",
    "training_target",
]
