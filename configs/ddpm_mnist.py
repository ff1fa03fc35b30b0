"""DDPM on MNIST (28x28): the CIFAR-10 recipe of Ho et al. 2020 scaled to a small grayscale set.

28 = 4 * 7, so three resolution levels (28, 14, 7) with attention at 14x14. Reads the IDX files from
$RESEARCH_DATA_DIR/mnist (or --config.data.data_dir). Set --config.data.name=fashion_mnist for Fashion-MNIST.
"""

from research.config import base_config


def get_config():
    c = base_config()
    c.data.name = "mnist"
    c.data.image_size = 28
    c.data.channels = 1

    c.model.ch = 64
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (14,)
    c.model.dropout = 0.1

    c.diffusion.schedule = "linear"
    c.diffusion.timesteps = 1000

    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000

    c.train.batch_size = 128
    c.train.num_steps = 50_000
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.sample_every = 5000
    return c
