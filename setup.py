"""Installable package for the `research` diffusion codebase."""

from setuptools import find_packages, setup

setup(
    name="research",
    version="0.1.0",
    description="Functional JAX/Flax diffusion models: DDPM, DDIM, sharded training, exact resume.",
    packages=find_packages(include=["research", "research.*", "configs", "experiments"]),
    python_requires=">=3.10",
    # Ranges are the ones the test suite was run against.
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "einops>=0.8,<0.9",
        "transformers>=5,<6",  # the CLIP tokenizer (PyTorch is needed only by the tests' references)
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "absl-py>=2.0",
        "tensorboardX>=2.6,<3",  # TensorBoard event files of every run
    ],
    extras_require={
        # References the tests compare against. torch is pinned to the version whose CPU wheel the
        # test machines carry; an unpinned torch would pull several GB of CUDA packages.
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.8,<4",
            "torch==2.13.0",
            "diffusers>=0.30,<0.43",
            "ruff==0.17.6",  # pinned: `ruff format --check` in .ci/run must see the same style every time
        ],
    },
)
