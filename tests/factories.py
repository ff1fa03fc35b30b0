"""Tiny configs shared by the tests (imported by conftest's fixtures and by tests directly; not a test file).

Every registered task has a factory in TASK_CONFIGS, so the parametrised tests over tasks (tests/test_tasks.py)
cover a new task as soon as it is registered; a task without a factory fails there.
Runs default to a one-device mesh (train.num_devices=1); the sharding tests ask for all 8 simulated devices.
"""

import os

import ml_collections

from research.config import base_config


def make_tiny_config():
    """A U-Net small enough to compile and train in seconds on digits (8x8)."""
    c = base_config()
    c.data.name = "digits"
    c.model.ch = 16
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1
    c.model.norm_groups = 8
    c.diffusion.timesteps = 100
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.ckpt_every = 3
    c.train.sample_every = 0
    c.train.progress = False
    c.train.num_devices = 1
    c.sample.num = 8
    c.sample.steps = "10"
    return c


def make_tiny_vae_config():
    """f=2 autoencoder (8x8 digits -> 4x4x2) with a small PatchGAN that switches on at step 10 of 20."""
    c = base_config()
    c.task = "autoencoder"
    c.model = ml_collections.ConfigDict(
        dict(
            name="vae",
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            z_channels=2,
            attn_resolutions=(),
            num_heads=1,
            dropout=0.0,
            norm_groups=4,
        )
    )
    c.autoencoder.disc_weight = 0.5
    c.autoencoder.disc_start = 10
    c.autoencoder.disc_lr = 1e-3
    c.autoencoder.disc_ch = 8
    c.autoencoder.disc_layers = 2
    c.autoencoder.disc_norm_groups = 4
    c.autoencoder.scale_num_images = 256
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 0.0
    c.train.batch_size = 16
    c.train.num_steps = 20
    c.train.ema_decay = 0.9
    c.train.log_every = 1
    c.train.ckpt_every = 5
    c.train.sample_every = 10
    c.train.progress = False
    c.train.num_devices = 1
    c.sample.num = 16
    return c


def make_tiny_ct_config():
    """Consistency training from scratch (no teacher) on the tiny U-Net: CM's curriculum with an EMA target."""
    c = make_tiny_config()
    c.task = "fewstep"
    c.diffusion.prediction = "v"
    c.fewstep.method = "ct"
    c.fewstep.curriculum = "cm"
    c.fewstep.s0, c.fewstep.s1 = 2, 8
    return c


def make_tiny_classifier_config():
    """ADM's noise-aware classifier on digits (8x8): the tiny U-Net's encoder half and attention pooling, 10 classes,
    on the tiny diffusion config's schedule (so it could guide make_tiny_config's model)."""
    c = make_tiny_config()
    c.task = "noisy_classifier"
    c.model = ml_collections.ConfigDict(
        dict(
            name="half_unet",
            num_classes=10,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            num_heads=1,
            dropout=0.1,
            pool="attention",
            norm_groups=8,
        )
    )
    c.data.num_classes = 10
    return c


def make_tiny_clip_config():
    """A CLIP on captioned digits (8x8, 2x2 patches): both towers width 32, 2 layers of 2 heads, 16-token captions;
    an EMA so the 8-device comparison of tests/test_tasks.py has one to compare."""
    c = make_tiny_config()
    c.task = "clip"
    c.model = ml_collections.ConfigDict(
        dict(
            name="clip",
            embed_dim=32,
            image_size=8,
            patch_size=2,
            vision_width=32,
            vision_layers=2,
            vision_heads=2,
            context_length=16,
            text_width=32,
            text_layers=2,
            text_heads=2,
            logit_bias_init=None,
        )
    )
    c.data.num_classes = 10
    c.optim.optimizer = "adamw"
    c.optim.weight_decay = 0.1
    c.train.ema_decay = 0.5
    c.train.sample_every = 0
    c.clip.shift = 1
    c.clip.eval_num = 200
    return c


def make_tiny_t2i_config():
    """A text-conditional U-Net on captioned 8x8 digits (two levels of 16 and 32 channels, cross-attention in the
    middle block) with a jointly trained text encoder (width 32, 2 layers, 16 tokens) and prompt dropout."""
    c = make_tiny_config()
    c.task = "text_to_image"
    c.model = ml_collections.ConfigDict(
        dict(
            name="cond_unet",
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_levels=(False, False),  # cross-attention in the middle block only
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=8,
            dropout=0.1,
            context_length=16,
        )
    )
    c.text.width, c.text.layers, c.text.heads, c.text.context_length = 32, 2, 2, 16
    c.diffusion.cond_drop_prob = 0.1
    c.sample.num = 10
    return c


_BASE_RUNS = {}


def tiny_controlnet_base() -> str:
    """Workdir of a class-conditional tiny U-Net with a null label, trained 2 steps (made once per process): the
    frozen base of the ControlNet tests."""
    if "workdir" not in _BASE_RUNS:
        import tempfile

        from research.train.loop import train

        c = make_tiny_config()
        c.model.num_classes, c.model.null_label, c.data.num_classes = 10, True, 10
        c.model.dropout = 0.0  # the ControlNet runs its base with train=False
        c.diffusion.cond_drop_prob = 0.1
        c.train.num_steps, c.train.ckpt_every = 2, 2
        workdir = os.path.join(tempfile.mkdtemp(prefix="controlnet-base-"), "base")
        train(c, workdir)
        _BASE_RUNS["workdir"] = workdir
    return _BASE_RUNS["workdir"]


def make_tiny_controlnet_config(base: str = ""):
    """A ControlNet (hint encoder 8 -> 16 channels, no stride) on tiny_controlnet_base (or `base`), Canny hints of
    the 8x8 digits, half the labels dropped."""
    c = make_tiny_config()
    c.task = "controlnet"
    c.controlnet.base = base or tiny_controlnet_base()
    c.controlnet.eval_num = 16
    c.model = ml_collections.ConfigDict(
        dict(name="unet_controlnet", hint_channels=(8, 16), hint_downsample=1, conditioning_channels=1)
    )
    c.data.num_classes = 10
    c.diffusion.cond_drop_prob = 0.5
    return c


def make_tiny_resume_configs():
    """{task: (config, steps before the interruption)} for the parametrised resume and sharding tests. The
    autoencoder is stopped before its discriminator starts and resumed across the switch."""
    vae = make_tiny_vae_config()
    vae.train.num_steps, vae.autoencoder.disc_start, vae.train.sample_every = 8, 4, 0
    vae.train.ckpt_every = 3
    return {
        "diffusion": (make_tiny_config(), 3),
        "autoencoder": (vae, 3),
        "fewstep": (make_tiny_ct_config(), 3),
        "noisy_classifier": (make_tiny_classifier_config(), 3),
        "clip": (make_tiny_clip_config(), 3),
        "text_to_image": (make_tiny_t2i_config(), 3),
        "controlnet": (make_tiny_controlnet_config(), 3),
    }
