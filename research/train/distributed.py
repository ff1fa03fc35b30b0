"""Multi-host start-up: one process per host (or per GPU) joins a jax.distributed cluster before anything else runs.

After `initialize`, jax.devices() lists every device of every process; the run's mesh spans them all, each process
reads its own slice of the global batch (research.data.make_train_iterator with process_index / process_count),
orbax writes every checkpoint collectively, and only process 0 writes logs, previews and run files.

Where the cluster is described:
  - flags of `python -m research.train`: --coordinator HOST:PORT --num-processes N --process-id I
    [--local-devices 0,1,...];
  - or the environment: RESEARCH_COORDINATOR, RESEARCH_NUM_PROCESSES, RESEARCH_PROCESS_ID
    [, RESEARCH_LOCAL_DEVICES];
  - or `--distributed auto`: jax.distributed.initialize() finds the cluster itself on Cloud TPU pods, under SLURM
    and under Open MPI (mpirun), so a TPU pod needs only that flag on every worker.
Nothing given: a single process, as before.

On CPU the processes exchange data through gloo (jax_cpu_collectives_implementation), which lets a laptop run a
multi-process job against localhost: tests/test_distributed.py trains with two processes of one device each and
gets the step of one process with two devices.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

ENV = {
    "coordinator": "RESEARCH_COORDINATOR",
    "num_processes": "RESEARCH_NUM_PROCESSES",
    "process_id": "RESEARCH_PROCESS_ID",
    "local_devices": "RESEARCH_LOCAL_DEVICES",
}


class ClusterError(ValueError):
    """An incomplete or inconsistent cluster description."""


def cluster_from(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_devices: Optional[Sequence[int]] = None,
    environ=None,
) -> Optional[dict]:
    """The keyword arguments of jax.distributed.initialize from explicit values, else the RESEARCH_* environment;
    None when neither names a coordinator (one process). 'auto' as coordinator -> {} (jax detects the cluster)."""
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV["coordinator"]) or None
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ClusterError("--num-processes / --process-id need --coordinator HOST:PORT (or --distributed auto)")
        return None
    if coordinator == "auto":
        return {}
    if num_processes is None and environ.get(ENV["num_processes"]):
        num_processes = int(environ[ENV["num_processes"]])
    if process_id is None and environ.get(ENV["process_id"]):
        process_id = int(environ[ENV["process_id"]])
    if local_devices is None and environ.get(ENV["local_devices"]):
        local_devices = [int(i) for i in environ[ENV["local_devices"]].split(",")]
    if ":" not in coordinator:
        raise ClusterError(f"coordinator {coordinator!r} must be HOST:PORT (process 0's address), e.g. node0:1234")
    if num_processes is None or process_id is None:
        raise ClusterError(
            f"coordinator {coordinator} given without the number of processes and this process's id: pass "
            f"--num-processes N --process-id I (or set {ENV['num_processes']} and {ENV['process_id']})"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ClusterError(f"process id {process_id} is not in [0, {num_processes}) (--process-id, --num-processes)")
    kwargs = dict(coordinator_address=coordinator, num_processes=int(num_processes), process_id=int(process_id))
    if local_devices is not None:
        kwargs["local_device_ids"] = list(local_devices)
    return kwargs


def initialize(**cluster) -> bool:
    """Join the cluster described by cluster_from's arguments (flags or environment); False when there is none.
    Must run before any other JAX call of the process."""
    kwargs = cluster_from(**cluster)
    if kwargs is None:
        return False
    import jax

    # Only the CPU backend reads this; GPUs and TPUs use their own interconnect. (A jax without the option
    # has no CPU collectives to choose.)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(**kwargs)
    return True
