"""The run loader: a trained network and its parameters from a workdir, for any task.

    config, model, params, step = load_run("runs/mnist")            # newest checkpoint, EMA parameters
    config, model, params, step = load_run("runs/mnist", 5000, use_ema=False)

The network is rebuilt from the run's config.json (research.shapes.build_network) and the parameters of its
part 'net' are read from the checkpoint as saved; their shapes are checked against the network before anything
runs, so a config.json edited by hand fails with the differing parameters named.
"""

from __future__ import annotations

from typing import Optional

import jax

from research.config import ConfigError
from research.run import load_params
from research.shapes import abstract_net_params, build_network


def check_params_fit(model, config, params, where: str) -> None:
    expected = abstract_net_params(model, config)
    flat_e = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_g = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    if flat_e != flat_g:
        diffs = [
            f"{k}: checkpoint {flat_g.get(k)} vs model {flat_e.get(k)}"
            for k in sorted(set(flat_e) | set(flat_g))
            if flat_e.get(k) != flat_g.get(k)
        ]
        raise ConfigError(
            f"the parameters in {where} do not fit the network its config.json builds "
            f"({len(diffs)} differ, e.g. {'; '.join(diffs[:3])}); was config.json edited?"
        )


def load_run(workdir: str, step: Optional[int] = None, use_ema: bool = True):
    """-> (config, model, params, step) of a training workdir's main network ('net')."""
    config, params, step = load_params(workdir, step, use_ema=use_ema)
    model = build_network(config)
    check_params_fit(model, config, params, f"{workdir} (step {step})")
    return config, model, params, step


__all__ = ["check_params_fit", "load_run"]
