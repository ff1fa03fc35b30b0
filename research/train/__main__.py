"""python -m research.train --config configs/X.py --workdir DIR [--config.a.b=v ...]
    [--coordinator HOST:PORT --num-processes N --process-id I [--local-devices 0,1]] [--distributed auto]

Trains from the config, resuming automatically from the newest checkpoint in DIR.

Several hosts (one process per host, or per GPU with --local-devices): start the same command on every process
with its --process-id; process 0's address is the coordinator. The RESEARCH_COORDINATOR, RESEARCH_NUM_PROCESSES,
RESEARCH_PROCESS_ID (and RESEARCH_LOCAL_DEVICES) environment variables do the same. On a Cloud TPU pod, under SLURM
or mpirun, `--distributed auto` finds the cluster. See research/train/distributed.py and the README.
"""

from __future__ import annotations

import logging
import sys

from research.config import ConfigError, base_config, config_help, parse_config_args
from research.tasks import get_config

USAGE = __doc__


_CLUSTER_FLAGS = {
    "--coordinator": ("coordinator", str),
    "--num-processes": ("num_processes", int),
    "--process-id": ("process_id", int),
    "--local-devices": ("local_devices", lambda v: [int(i) for i in v.split(",")]),
    "--distributed": ("coordinator", str),  # 'auto'
}


def pop_cluster_flags(rest: list) -> dict:
    """Remove the multi-host flags from `rest` (in place) and return them as distributed.initialize arguments."""
    from research.config import ConfigError

    out = {}
    for flag, (name, parse) in _CLUSTER_FLAGS.items():
        for i, arg in enumerate(list(rest)):
            if arg == flag or arg.startswith(flag + "="):
                if arg == flag:
                    if i + 1 >= len(rest):
                        raise ConfigError(f"{flag} needs a value")
                    value = rest[i + 1]
                    del rest[i : i + 2]
                else:
                    value = arg.split("=", 1)[1]
                    del rest[i]
                if flag == "--distributed" and value != "auto":
                    raise ConfigError(f"--distributed {value!r}: the only value is 'auto' (jax finds the cluster)")
                try:
                    out[name] = parse(value)
                except ValueError:
                    raise ConfigError(f"{flag}={value!r} is not valid") from None
                break
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        print("Config keys (defaults of the base config):")
        print(config_help(base_config()))
        return 0
    try:
        path, overrides, rest = parse_config_args(argv)
        workdir = None
        if "--workdir" in rest:
            i = rest.index("--workdir")
            workdir = rest[i + 1] if i + 1 < len(rest) else None
            rest = rest[:i] + rest[i + 2 :]
        else:
            for arg in list(rest):
                if arg.startswith("--workdir="):
                    workdir = arg.split("=", 1)[1]
                    rest.remove(arg)
        if path is None or workdir is None:
            raise ConfigError("both --config FILE and --workdir DIR are required (see --help)")
        cluster = pop_cluster_flags(rest)
        if rest:
            raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
        from research.train import distributed

        try:
            distributed.initialize(**cluster)  # before anything touches a device
        except distributed.ClusterError as e:
            raise ConfigError(str(e)) from None
        config = get_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Orbax and absl log every checkpoint file at INFO; keep the terminal for the progress bar and our messages.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("research").setLevel(logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    from research.data import DataError
    from research.train.checkpoint import CheckpointDamagedError, CheckpointMismatchError
    from research.train.loop import TrainingDiverged, train

    try:
        result = train(config, workdir)
    except (ConfigError, DataError, CheckpointMismatchError, CheckpointDamagedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"finished at step {result['step']}; workdir: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
