"""Damaged checkpoints: each way of breaking the newest one's files is named, skipped for the previous step's exact
state, never deleted, and does not block later saves (including a save at the damaged step's own number)."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from research.train.checkpoint import CheckpointDamagedError, Checkpointer, CheckpointMismatchError

# Orbax leaves its failed asynchronous reads of a damaged store unawaited; that noise is not what is tested here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

STEPS = (2, 4, 6)
META_PARAMS = {"['w']": [8, 4]}


def _mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def make_state(step: int):
    """A train-state-like tree: a sharded float array, a replicated int array, a host numpy leaf, a scalar."""
    mesh = _mesh()
    w = jnp.arange(32, dtype=jnp.float32).reshape(8, 4) * step + 0.25
    return {
        "w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("data"))),
        "opt": {"mu": jax.device_put(jnp.full((3,), -step, jnp.int32), NamedSharding(mesh, PartitionSpec()))},
        "host": np.linspace(0, 1, 5).astype(np.float64) * step,
        "step": jnp.asarray(step, jnp.int32),
    }


def abstract_state():
    mesh = _mesh()
    return {
        "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data"))),
        "opt": {"mu": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))},
        "host": np.zeros(5, np.float64),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())),
    }


def meta_for(step):
    return {"params": META_PARAMS, "model": {"ch": 16}, "step": step}


def assert_state_equal(got, step):
    want = make_state(step)
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(jax.device_get(g)), np.asarray(jax.device_get(w))
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    ckpt = Checkpointer(directory, max_to_keep=3)
    for step in STEPS:
        ckpt.save(step, make_state(step), {"position": step}, meta_for(step))
    ckpt.wait()
    ckpt.close()
    return directory


@pytest.fixture
def run(saved_run, tmp_path):
    """A fresh copy of the three checkpoints for a test to damage."""
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(saved_run, directory)
    return directory


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\x00 not what was saved " * 3)


def _empty(path):
    open(path, "wb").close()


def _flip_middle_byte(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def _array_chunk(step_dir):
    """The file of the state item's array store holding the arrays (a content-addressed name)."""
    folder = os.path.join(step_dir, "state", "d")
    (name,) = os.listdir(folder)
    return os.path.join(folder, name)


# (id, damage(step_dir), words the reported reason must contain)
DAMAGE = [
    ("meta-json-garbage", lambda d: _garbage(os.path.join(d, "meta", "metadata")), "meta/metadata is not valid JSON"),
    ("meta-json-empty", lambda d: _empty(os.path.join(d, "meta", "metadata")), "meta/metadata is not valid JSON"),
    (
        "meta-json-not-object",
        lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("[1, 2]"),
        "meta/metadata holds a list",
    ),
    ("data-json-garbage", lambda d: _garbage(os.path.join(d, "data", "metadata")), "data/metadata is not valid JSON"),
    ("data-json-deleted", lambda d: os.remove(os.path.join(d, "data", "metadata")), "data/metadata is missing"),
    (
        "state-METADATA-garbage",
        lambda d: _garbage(os.path.join(d, "state", "_METADATA")),
        "state/_METADATA is not valid JSON",
    ),
    (
        "state-METADATA-truncated",
        lambda d: open(os.path.join(d, "state", "_METADATA"), "r+b").truncate(30),
        "state/_METADATA is not valid JSON",
    ),
    (
        "state-array-metadata-empty",
        lambda d: _empty(os.path.join(d, "state", "array_metadatas", "process_0")),
        "state/array_metadatas/process_0 is not valid JSON",
    ),
    ("state-manifest-garbage", lambda d: _garbage(os.path.join(d, "state", "manifest.ocdbt")), "state/manifest.ocdbt"),
    (
        "state-manifest-bitflip",
        lambda d: _flip_middle_byte(os.path.join(d, "state", "manifest.ocdbt")),
        "DATA_LOSS reading state/manifest.ocdbt",
    ),
    ("state-array-store-bitflip", lambda d: _flip_middle_byte(_array_chunk(d)), "DATA_LOSS reading state/d/"),
    ("state-array-store-garbage", lambda d: _garbage(_array_chunk(d)), "reading state/d/"),
    ("state-array-store-deleted", lambda d: os.remove(_array_chunk(d)), "state/d/"),
    ("state-folder-deleted", lambda d: shutil.rmtree(os.path.join(d, "state")), "its state/ folder is missing"),
]


@pytest.mark.parametrize("damage,words", [(f, w) for _, f, w in DAMAGE], ids=[i for i, _, _ in DAMAGE])
def test_damaged_newest_falls_back_to_previous_exact_state(run, damage, words, caplog):
    damage(os.path.join(run, "6"))
    ckpt = Checkpointer(run, max_to_keep=3)
    with pytest.raises(CheckpointDamagedError) as info:
        ckpt.restore(6, abstract_state())
    assert f"the checkpoint at step 6 in {run} is damaged (" in str(info.value) and words in str(info.value)
    assert info.value.damaged[0][0] == 6

    seen = []
    with caplog.at_level(logging.WARNING, logger="research"):
        step, state, data_state, meta, skipped = ckpt.restore_newest_intact(
            abstract_state(), check=lambda s, m: seen.append((s, m["step"]))
        )
    ckpt.close()
    assert step == 4 and data_state == {"position": 4} and meta == meta_for(4)
    assert_state_equal(state, 4)
    assert [s for s, _ in skipped] == [6] and words in skipped[0][1]
    # check() saw every meta it could read, newest first, before that step's state was restored
    assert seen[-1] == (4, 4) and all(s == m for s, m in seen)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "research"]
    assert len(warnings) == 1 and "step 6" in warnings[0] and "using step 4 instead" in warnings[0]
    assert os.path.isdir(os.path.join(run, "6"))  # not deleted

    # The same fallback for a reader that takes the tree as saved instead of building the train state.
    ckpt = Checkpointer(run, max_to_keep=3)
    one_device = SingleDeviceSharding(jax.devices()[0])
    step, state, _, _, skipped = ckpt.restore_newest_intact(lambda s: ckpt.saved_abstract(s, one_device))
    ckpt.close()
    assert step == 4 and [s for s, _ in skipped] == [6] and words in skipped[0][1]
    assert all(leaf.sharding == one_device for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))
    assert_state_equal(state, 4)


def test_read_meta_names_damaged_meta(run):
    _garbage(os.path.join(run, "6", "meta", "metadata"))
    ckpt = Checkpointer(run, max_to_keep=3)
    assert ckpt.read_meta(4) == meta_for(4)
    with pytest.raises(CheckpointDamagedError, match=r"the checkpoint at step 6 in .* is damaged \(meta/metadata"):
        ckpt.read_meta(6)
    ckpt.close()


def test_every_checkpoint_damaged_names_them_all(run):
    _garbage(os.path.join(run, "6", "meta", "metadata"))
    _flip_middle_byte(_array_chunk(os.path.join(run, "4")))
    shutil.rmtree(os.path.join(run, "2", "data"))
    ckpt = Checkpointer(run, max_to_keep=3)
    with pytest.raises(CheckpointDamagedError) as info:
        ckpt.restore_newest_intact(abstract_state())
    ckpt.close()
    message = str(info.value)
    assert [s for s, _ in info.value.damaged] == [6, 4, 2]
    assert "steps 6, 4, 2 are damaged" in message
    for words in ("step 6: meta/metadata", "step 4: DATA_LOSS reading state/d/", "step 2: its data/ folder"):
        assert words in message


def test_restricted_steps_and_no_checkpoint(run, tmp_path):
    _garbage(os.path.join(run, "6", "state", "_METADATA"))
    ckpt = Checkpointer(run, max_to_keep=3)
    with pytest.raises(CheckpointDamagedError, match=r"the checkpoint at step 6 is damaged") as info:
        ckpt.restore_newest_intact(abstract_state(), steps=[6])
    assert [s for s, _ in info.value.damaged] == [6]
    step, state, *_ = ckpt.restore_newest_intact(abstract_state(), steps=[2])
    assert step == 2
    assert_state_equal(state, 2)
    ckpt.close()
    empty = Checkpointer(str(tmp_path / "empty"), max_to_keep=3)
    assert empty.restore_newest_intact(abstract_state()) is None
    empty.close()


def test_mismatch_is_not_damage(run):
    """A check that refuses a step propagates (no fallback to an older step), also after skipping a damaged
    one; the real check_compatible on the meta already read, and a train-state tree with another structure,
    raise CheckpointMismatchError."""
    ckpt = Checkpointer(run, max_to_keep=3)

    def refuse(step, meta):
        raise CheckpointMismatchError(f"refused {step}")

    with pytest.raises(CheckpointMismatchError, match="refused 6"):
        ckpt.restore_newest_intact(abstract_state(), check=refuse)
    new_meta = {"params": {"['w']": [8, 5]}, "model": {"ch": 32}}
    with pytest.raises(CheckpointMismatchError, match=r"model.ch: checkpoint 16 vs config 32"):
        ckpt.restore_newest_intact(abstract_state(), check=lambda s, saved: ckpt.check_compatible(s, new_meta, saved))
    other = {**abstract_state(), "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(CheckpointMismatchError, match="different train-state structure"):
        ckpt.restore_newest_intact(other)
    ckpt.close()

    _empty(os.path.join(run, "6", "data", "metadata"))
    ckpt = Checkpointer(run, max_to_keep=3)
    with pytest.raises(CheckpointMismatchError, match="refused 4"):
        ckpt.restore_newest_intact(abstract_state(), check=lambda s, m: refuse(s, m) if s == 4 else None)
    ckpt.close()


def test_resume_before_damaged_step_then_save_over_it(run, caplog):
    """Newest step 6 damaged, resume from 4, save 5 and 6 again: the damaged folder is moved aside (kept byte for
    byte), the new 6 restores exactly, and later saves with max_to_keep collecting old steps never touch it."""
    meta_path = os.path.join(run, "6", "meta", "metadata")
    _garbage(meta_path)
    with open(meta_path, "rb") as f:
        damaged_bytes = f.read()
    ckpt = Checkpointer(run, max_to_keep=3)
    step, state, data_state, _, skipped = ckpt.restore_newest_intact(abstract_state())
    assert step == 4 and [s for s, _ in skipped] == [6]
    with caplog.at_level(logging.WARNING, logger="research"):
        for new_step in (5, 6):
            ckpt.save(new_step, make_state(10 * new_step), {"position": new_step}, meta_for(new_step))
            ckpt.wait()
    moved = [n for n in os.listdir(run) if n.startswith("6.damaged-")]
    assert len(moved) == 1
    with open(os.path.join(run, moved[0], "meta", "metadata"), "rb") as f:
        assert f.read() == damaged_bytes
    assert any(
        "moved the damaged checkpoint at step 6" in r.getMessage() and moved[0] in r.getMessage()
        for r in caplog.records
    )
    assert sorted(ckpt.all_steps()) == [4, 5, 6]  # max_to_keep=3 collected step 2
    for new_step in (7, 8, 9):
        ckpt.save(new_step, make_state(10 * new_step), {"position": new_step}, meta_for(new_step))
    ckpt.wait()
    ckpt.close()

    fresh = Checkpointer(run, max_to_keep=3)
    assert sorted(fresh.all_steps()) == [7, 8, 9]
    assert os.path.isdir(os.path.join(run, moved[0]))
    got, data_state, _ = fresh.restore(9, abstract_state())
    assert data_state == {"position": 9}
    assert_state_equal(got, 90)
    fresh.close()


def test_new_six_restores_exactly(run):
    _flip_middle_byte(_array_chunk(os.path.join(run, "6")))
    ckpt = Checkpointer(run, max_to_keep=None)
    assert ckpt.restore_newest_intact(abstract_state())[0] == 4
    ckpt.save(6, make_state(60), {"position": 6}, meta_for(6))
    ckpt.wait()
    ckpt.close()
    fresh = Checkpointer(run, max_to_keep=None)
    step, state, data_state, meta, skipped = fresh.restore_newest_intact(abstract_state())
    fresh.close()
    assert (step, data_state, meta, skipped) == (6, {"position": 6}, meta_for(6), [])
    assert_state_equal(state, 60)


def test_garbage_collection_past_an_unread_damaged_step(run):
    """The oldest step's files are all broken and nobody restored it: saves that make max_to_keep collect it
    still succeed, and the newest steps restore exactly."""
    old = os.path.join(run, "2")
    for rel in ("_CHECKPOINT_METADATA", "meta/metadata", "data/metadata", "state/_METADATA", "state/manifest.ocdbt"):
        _garbage(os.path.join(old, rel))
    ckpt = Checkpointer(run, max_to_keep=3)
    ckpt.save(8, make_state(8), {"position": 8}, meta_for(8))
    ckpt.save(10, make_state(10), {"position": 10}, meta_for(10))
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [6, 8, 10]
    step, state, *_ = ckpt.restore_newest_intact(abstract_state())
    ckpt.close()
    assert step == 10
    assert_state_equal(state, 10)


def test_save_at_or_below_an_intact_newest_step_is_an_error(run):
    """Orbax silently declines such a save; the checkpointer says so instead of losing it."""
    ckpt = Checkpointer(run, max_to_keep=3)
    with pytest.raises(ValueError, match=r"cannot save step 5 in .*: it already holds checkpoint\(s\) \[6\]"):
        ckpt.save(5, make_state(5), {}, meta_for(5))
    ckpt.close()
