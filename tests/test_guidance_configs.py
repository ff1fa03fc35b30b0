"""The ImageNet-64 guidance configs build the networks of the papers' released code, counted exactly.

The reference counts are those of guided-diffusion's create_model / create_classifier (the code released with
Dhariwal & Nichol 2021) called with the flags its README gives for the 64x64 model and classifier:
sum(p.numel() for p in model.parameters()) = 295,904,454 for the conditional diffusion model and 65,438,568 for the
classifier. The network options these counts exercise (resampling residual blocks, scale-shift norm, 64-channel
heads, attention pooling) are checked numerically against diffusers in tests/test_unet.py and
tests/test_classifier_guidance.py.
"""

import jax

from research.shapes import abstract_net_params, build_network
from research.summary import count_params
from research.tasks import get_config, validate_config

ADM64_DIFFUSION = 295_904_454
ADM64_CLASSIFIER = 65_438_568


def _count(config):
    validate_config(config)
    return count_params(abstract_net_params(build_network(config), config))


def test_adm64_diffusion_model_has_the_released_parameter_count():
    assert _count(get_config("configs/cfg_imagenet64.py:adm")) == ADM64_DIFFUSION


def test_cfg_variant_adds_only_the_null_label_row():
    config = get_config("configs/cfg_imagenet64.py:cfg")
    assert config.diffusion.cond_drop_prob == 0.1 and config.model.null_label
    # one extra row of the label table, of the time-embedding width 4 * 192
    assert _count(config) == ADM64_DIFFUSION + 4 * 192


def test_adm64_classifier_has_the_released_parameter_count():
    config = get_config("configs/classifier_imagenet64.py")
    assert config.task == "noisy_classifier"
    assert _count(config) == ADM64_CLASSIFIER
    # its logits cover ImageNet's classes
    out = jax.eval_shape(
        lambda p, x, t: build_network(config).apply({"params": p}, x, t),
        abstract_net_params(build_network(config), config),
        jax.ShapeDtypeStruct((2, 64, 64, 3), "float32"),
        jax.ShapeDtypeStruct((2,), "int32"),
    )
    assert out.shape == (2, 1000)
