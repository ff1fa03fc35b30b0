"""The full-scale plan (experiments/full_scale.py): compute from XLA's FLOP count, commands in dependency order, and
the measured step rate replacing the assumed throughput."""

import json
import os

import pytest

from experiments import full_scale
from research.summary import summarize
from research.tasks import get_config, task_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows():
    return full_scale.plan(150.0)


def test_compute_is_passes_times_batch_times_steps_times_forward_flops(rows):
    ddpm = rows[0]
    assert ddpm["params"] == 35_746_307  # the DDPM paper's 35.7M network
    net = task_of(config := get_config(os.path.join(REPO, "configs/ddpm_cifar10.py"))).network_config(config)
    gflops = summarize(net)["gflops"]
    assert ddpm["pflops"] == pytest.approx(3 * gflops * 1e9 * 128 * 800_000 / 1e15, rel=1e-9)
    assert ddpm["hours"] == pytest.approx(ddpm["pflops"] * 1e15 / 150e12 / 3600, rel=1e-9)
    by_name = {r["name"]: r for r in rows}
    cd = by_name["Consistency distillation (l2)"]
    # CD: batch 512 and 6 passes against DDPM's 128 and 3, over the same 800k steps and the same network
    assert cd["pflops"] == pytest.approx(ddpm["pflops"] * (512 / 128) * (6 / 3), rel=1e-9)
    assert by_name["Improved DDPM (L_hybrid)"]["params"] > ddpm["params"]  # 3 res blocks, attention at 8x8 too


def test_commands_train_a_teacher_before_its_students():
    lines = full_scale.commands()
    trains = [line for line in lines if line.startswith("python -m research.train")]
    assert len(trains) == len(full_scale.RUNS)
    for run in full_scale.RUNS:
        mine = next(i for i, line in enumerate(lines) if line.endswith(f"--workdir {run['workdir']}"))
        for need in run["needs"]:
            theirs = next(i for i, line in enumerate(lines) if line.endswith(f"--workdir {need}"))
            assert theirs < mine
    assert all("RUN" not in line for line in lines)


CONFIG = """
from tests.factories import make_tiny_config


def get_config():
    c = make_tiny_config()
    c.data.image_size = 8
    c.train.batch_size = 8
    c.train.num_steps = 1000
    return c
"""


@pytest.mark.slow
def test_measured_rate_replaces_the_assumption(tmp_path, monkeypatch):
    path = tmp_path / "tiny.py"
    path.write_text(CONFIG)
    run = dict(full_scale.RUNS[0], config=str(path), passes=3)
    student = dict(run, name="student", passes=6)
    monkeypatch.setattr(full_scale, "RUNS", [run, student])
    measured = full_scale.measure(8)
    (entry,) = measured.values()
    assert entry["batch"] == 8 and entry["steps_per_sec"] > 0 and "cpu" in entry["device"].lower()
    teacher_row, student_row = full_scale.plan(150.0, measured)
    assert teacher_row["hours"] == pytest.approx(1000 / entry["steps_per_sec"] / 3600, rel=1e-9)
    assert student_row["hours"] == pytest.approx(2 * teacher_row["hours"], rel=1e-9)
    assert teacher_row["source"].startswith("measured on")
    json.dumps(measured)  # printable, storable
