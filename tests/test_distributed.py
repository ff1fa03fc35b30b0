"""Multi-host training (research/train/distributed.py): two processes of one CPU device each, joined through a
localhost coordinator, train the same steps as one process with two devices; the cluster description is checked."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from research.train.distributed import ClusterError, cluster_from
from tests.conftest import REPO_ROOT


def test_cluster_from_flags_and_environment():
    assert cluster_from(environ={}) is None
    assert cluster_from("auto", environ={}) == {}
    env = {"RESEARCH_COORDINATOR": "node0:1234", "RESEARCH_NUM_PROCESSES": "4", "RESEARCH_PROCESS_ID": "3"}
    assert cluster_from(environ=env) == dict(coordinator_address="node0:1234", num_processes=4, process_id=3)
    # Flags win over the environment.
    assert cluster_from("h:1", 2, 1, [0, 1], environ=env) == dict(
        coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[0, 1]
    )
    with pytest.raises(ClusterError, match="without the number of processes"):
        cluster_from("h:1", environ={})
    with pytest.raises(ClusterError, match="HOST:PORT"):
        cluster_from("node0", 2, 0, environ={})
    with pytest.raises(ClusterError, match=r"process id 2 is not in \[0, 2\)"):
        cluster_from("h:1", 2, 2, environ={})
    with pytest.raises(ClusterError, match="need --coordinator"):
        cluster_from(None, 2, 0, environ={})


def test_cluster_flags_reach_the_command_line(tmp_path):
    from research.train.__main__ import main

    assert main(["--config", "x.py", "--workdir", str(tmp_path), "--num-processes", "2"]) == 2
    assert main(["--config", "x.py", "--workdir", str(tmp_path), "--distributed", "yes"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


CONFIG = """
from tests.factories import make_tiny_config


def get_config():
    c = make_tiny_config()
    c.model.dropout = 0.0
    c.model.ch_mult = (1,)  # one level: short compiles in three processes
    c.model.attn_resolutions = (8,)
    c.train.num_steps = 4
    c.train.ckpt_every = 2
    c.train.num_devices = {num_devices}
    c.train.tensorboard = False
    return c
"""


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def test_two_processes_train_the_step_of_one_process_with_two_devices(tmp_path):
    from research.run import restore_tree
    from research.tasks import get_config
    from research.train.loop import train

    for name, n in (("one.py", 2), ("multi.py", 0)):
        (tmp_path / name).write_text(textwrap.dedent(CONFIG.format(num_devices=n)))

    # Reference: this process (8 simulated devices), a mesh of its first two.
    single = str(tmp_path / "single")
    train(get_config(str(tmp_path / "one.py")), single)

    multi = str(tmp_path / "multi")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "research.train", "--config", str(tmp_path / "multi.py"), "--workdir", multi]
    cluster = ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            cmd + cluster + ["--process-id", str(i)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    assert "finished at step 4" in outs[0]

    with open(os.path.join(multi, "config.json")) as f:
        assert json.load(f)["train"]["num_devices"] == 0
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    for step in (2, 4):
        a, _, _ = restore_tree(single, step)
        b, _, _ = restore_tree(multi, step)
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        assert int(b["step"]) == step
