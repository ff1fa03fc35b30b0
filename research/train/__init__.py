"""Training: state, shardings, the jitted step, checkpoints and the driver loop.

`python -m research.train --config configs/X.py --workdir DIR` runs research/train/__main__.py.
"""
