"""python -m research.train --config configs/X.py --workdir DIR [--config.a.b=v ...]

Trains from the config, resuming automatically from the newest checkpoint in DIR.
"""

from __future__ import annotations

import logging
import sys

from research.config import ConfigError, base_config, config_help, parse_config_args
from research.tasks import get_config

USAGE = __doc__


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
        if rest:
            raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
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
