"""One Mesh over all devices, axes ('data', 'model'), and the shardings derived from it.

Batches are split along 'data'. Parameters (and optimizer moments, which share their shapes) are split
along 'model' on their last axis when it divides evenly; with mesh_model=1 everything is replicated and the
program is plain data parallelism. The same code runs on one CPU, on simulated CPU devices, on a GPU and
across TPU hosts: the compiler inserts the collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(model_axis: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_axis:
        raise ValueError(f"train.mesh_model={model_axis} does not divide the {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis, model_axis)
    return Mesh(grid, ("data", "model"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state):
    """NamedSharding for every leaf of a (shape-only) state pytree."""
    model = mesh.shape["model"]

    def rule(leaf):
        shape = getattr(leaf, "shape", ())
        if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
            return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "model"))
        return NamedSharding(mesh, P())

    return jax.tree.map(rule, abstract_state)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assemble a global array from this process's slice of the batch (works for one process too)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
