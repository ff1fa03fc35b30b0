"""python -m research.summary --config configs/X.py [--config.a.b=v ...]

Prints `params: N` and `gflops: G`, the forward FLOPs for one example counted by XLA's cost analysis of
the lowered program (a multiply-add counts as 2 FLOPs), and `gmacs: G/2`, the convention of papers that
count a multiply-add once (DiT's Gflops). Nothing is materialised or compiled: parameters exist only
as shapes (jax.eval_shape) and the program is only lowered from abstract inputs, whose HLO cost analysis
counts the same dot and convolution FLOPs as the compiled one's.
A user error (missing or unreadable config file, bad override) is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import sys

import jax

from research.config import ConfigError, parse_config_args
from research.tasks import get_config, task_of


def count_params(abstract_params) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(abstract_params)))


def forward_flops(model, config, abstract_params, batch: int = 1) -> float:
    """Forward FLOPs per example of the network on abstract inputs [batch, H, W, C] (+ t, cond; + tokens for CLIP)."""
    import jax.numpy as jnp

    from research.shapes import example_cond, model_input_shape

    x = jax.ShapeDtypeStruct((batch, *model_input_shape(config)), jnp.float32)
    if config.model.name == "vae":  # the autoencoder sees images alone

        def forward(params, x):
            return model.apply({"params": params}, x)

        args = (abstract_params, x)
    elif config.model.name == "clip":  # one image and one caption through both towers
        from research.shapes import example_tokens

        def forward(params, x, tokens):
            return model.apply({"params": params}, x, tokens)

        args = (abstract_params, x, jax.eval_shape(lambda: example_tokens(config, batch)))
    else:
        t = jax.ShapeDtypeStruct((batch,), jnp.int32)
        cond = jax.eval_shape(lambda: example_cond(config, batch))

        def forward(params, x, t, cond):
            return model.apply({"params": params}, x, t, cond, train=False)

        args = (abstract_params, x, t, cond)
    # Compiling a large model costs minutes on a CPU; the lowered program already carries the FLOP count.
    cost = jax.jit(forward).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]) / batch


def summarize(config) -> dict:
    from research.shapes import abstract_net_params, build_network

    model = build_network(config)
    params = abstract_net_params(model, config)
    out = {"params": count_params(params), "gflops": forward_flops(model, config, params) / 1e9}
    if config.model.name.endswith("_controlnet"):
        out["hint_params"] = count_params(params["hint"])
    return out


def main(argv=None) -> int:
    import os

    from research.cli import fail

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        path, overrides, rest = parse_config_args(argv)
        if path is None or rest:
            raise ConfigError(
                f"usage: python -m research.summary --config configs/X.py [--config.a.b=v ...]"
                f"{'; unexpected ' + ' '.join(rest) if rest else ''}"
            )
        file = path if os.path.isfile(path) or ":" not in path else path.rsplit(":", 1)[0]
        if os.path.isdir(file):
            raise ConfigError(f"--config {path} is a folder; give a config file such as configs/quickstart.py")
        if os.path.isfile(file) and not file.endswith(".py"):
            raise ConfigError(f"--config {path} is not a Python config file (.py defining get_config())")
        try:
            config = get_config(path, overrides)
            config = task_of(config).network_config(config)
        except ConfigError:
            raise
        except (SyntaxError, ImportError, TypeError, ValueError, NameError) as e:
            raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from None
    except ConfigError as e:
        return fail(e)
    result = summarize(config)
    from research.shapes import latent_enabled, model_input_shape

    h, w, c = model_input_shape(config)
    where = f" (latents of {config.latent.autoencoder})" if latent_enabled(config) else ""
    print(f"model: {config.model.name}  input: {h}x{w}x{c}{where}")
    print(f"params: {result['params']}")
    if "hint_params" in result:
        print(f"hint encoder params: {result['hint_params']}")
    print(f"gflops: {result['gflops']:.3f}")
    # Papers that count a multiply-add as one FLOP (DiT's Table 4 'Gflops') report half of XLA's figure.
    print(f"gmacs: {result['gflops'] / 2:.3f}  (multiply-adds, = gflops / 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
