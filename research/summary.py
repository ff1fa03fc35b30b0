"""python -m research.summary --config configs/X.py [--config.a.b=v ...]

Prints `params: N` and `gflops: G`, the forward FLOPs for one example counted by XLA's cost analysis of
the compiled program (a multiply-add counts as 2 FLOPs), and `gmacs: G/2`, the convention of papers that
count a multiply-add once (DiT's Gflops). Nothing is materialised: parameters exist only
as shapes (jax.eval_shape) and the program is compiled from abstract inputs.
"""

from __future__ import annotations

import sys

import jax

from research.config import ConfigError, get_config, parse_config_args


def count_params(abstract_params) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(abstract_params)))


def forward_flops(model, config, abstract_params, batch: int = 1) -> float:
    from research.train.loop import example_inputs
    x, t, y = example_inputs(config, batch)

    def forward(params, x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    compiled = jax.jit(forward).lower(abstract_params, x, t, y).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]) / batch


def summarize(config) -> dict:
    from research.train.loop import abstract_params, model_from_config
    model = model_from_config(config)
    params = abstract_params(model, config)
    return {"params": count_params(params), "gflops": forward_flops(model, config, params) / 1e9}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, overrides, rest = parse_config_args(argv)
        if path is None or rest:
            raise ConfigError("usage: python -m research.summary --config configs/X.py [--config.a.b=v ...]")
        config = get_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = summarize(config)
    from research.latents import latent_enabled, model_input_shape
    h, w, c = model_input_shape(config)
    where = f" (latents of {config.latent.autoencoder})" if latent_enabled(config) else ""
    print(f"model: {config.model.name}  input: {h}x{w}x{c}{where}")
    print(f"params: {result['params']}")
    print(f"gflops: {result['gflops']:.3f}")
    # Papers that count a multiply-add as one FLOP (DiT's Table 4 'Gflops') report half of XLA's figure.
    print(f"gmacs: {result['gflops'] / 2:.3f}  (multiply-adds, = gflops / 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
