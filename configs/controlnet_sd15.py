"""A ControlNet for Stable Diffusion v1.5 (Zhang, Rao & Agrawala 2023; the released lllyasviel/sd-controlnet-* and
control_v11*_sd15_* models): a trainable copy of SD 1.5's U-Net encoder and middle block (configs/sd15.py) with the
hint encoder of the reference code (3x3 convs 16, 32, 96, 256 with SiLU, three stride-2 steps: 512x512x3 hints ->
64x64, then a zero conv to 320 channels) and a zero 1x1 conv on each of the 12 skips and on the middle output:
361,279,120 parameters, 1,086,480 of them in the hint encoder (`python -m research.summary --config
configs/controlnet_sd15.py`).

Released ControlNets load with research.pretrained.convert_controlnet.load_diffusers_controlnet(FOLDER) and run with
`python -m research.generate --pretrained SD15 --controlnet FOLDER --hint IMAGE`. The paper trains them with AdamW at
lr 1e-5, batch 256, dropping 50% of the prompts; training on a Stable Diffusion base through task='controlnet' is
not implemented (that task controls pixel-space U-Net runs), so this config describes the architecture.
"""

from ml_collections import ConfigDict

from configs.sd15 import get_config as sd15_config


def get_config() -> ConfigDict:
    c = sd15_config()
    c.task = "controlnet"
    fields = c.model.to_dict()
    fields.update(
        name="cond_unet_controlnet", hint_channels=(16, 32, 96, 256), hint_downsample=8, conditioning_channels=3
    )
    with c.unlocked():
        c.model = ConfigDict(fields)
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 0
    c.train.batch_size = 256
    c.diffusion.cond_drop_prob = 0.5
    return c
