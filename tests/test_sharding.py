"""Sharding rules by parameter name (research/train/mesh.py): which spec each leaf gets, and that an FSDP or
FSDP + tensor-parallel training step on 8 simulated devices computes the one-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.config import apply_overrides
from research.data import make_train_iterator
from research.train import mesh as mesh_lib
from research.train.loop import build_trainer


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _tree():
    """A hand-made state: two parts, an optax-like moment tree mirroring the params, a scalar and a key."""
    net = {
        "conv": {"kernel": _sds(3, 3, 16, 32), "bias": _sds(32)},
        "dense": {"kernel": _sds(64, 64)},  # tie: the last axis
        "wide": {"kernel": _sds(48, 40)},  # both divisible by 8: the larger (axis 0)
        "odd": {"kernel": _sds(12, 16)},  # only axis 1 divisible by 8
        "stem": {"kernel": _sds(24, 3, 16)},  # largest divisible axis first
        "prime": {"kernel": _sds(7, 9)},
    }  # no axis divisible
    disc = {"head": {"kernel": _sds(32, 6)}}
    return {
        "step": _sds(dtype=jnp.int32),
        "rng": _sds(2, dtype=jnp.uint32),
        "params": {"net": net, "disc": disc},
        "opt_state": {"net": (None, ({"count": _sds(dtype=jnp.int32), "mu": net},))},
    }


def _flat_specs(tree, specs):
    names = [mesh_lib.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return dict(zip(names, jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))))


def test_path_names_follow_dicts_tuples_and_attributes():
    import optax

    tx = optax.chain(optax.identity(), optax.adam(1e-3))
    names = [
        mesh_lib.path_name(p)
        for p, _ in jax.tree_util.tree_flatten_with_path({"opt_state": {"net": tx.init({"w": jnp.zeros(3)})}})[0]
    ]
    assert names == ["opt_state/net/1/0/count", "opt_state/net/1/0/mu/w", "opt_state/net/1/0/nu/w"]


def test_fsdp_picks_the_largest_divisible_axis_and_replicates_small_leaves():
    tree = _tree()
    specs = _flat_specs(tree, mesh_lib.state_specs(tree, data=8, model=1, rules=((".*", "fsdp"),), fsdp_min_size=64))
    assert specs["params/net/conv/kernel"] == P(None, None, None, "data")
    assert specs["params/net/conv/bias"] == P()  # 32 < 64 elements
    assert specs["params/net/dense/kernel"] == P(None, "data")
    assert specs["params/net/wide/kernel"] == P("data", None)
    assert specs["params/net/odd/kernel"] == P(None, "data")
    assert specs["params/net/stem/kernel"] == P("data", None, None)
    assert specs["params/net/prime/kernel"] == P()  # 63 elements and no axis divisible by 8
    assert specs["params/disc/head/kernel"] == P("data", None)
    # optimizer moments mirror the params and get the same specs; scalars are replicated whatever the rule
    assert specs["opt_state/net/1/0/mu/conv/kernel"] == P(None, None, None, "data")
    assert specs["opt_state/net/1/0/count"] == P() and specs["step"] == P() and specs["rng"] == P()
    # the size threshold is inclusive, and below it 'fsdp' replicates
    specs = _flat_specs(tree, mesh_lib.state_specs(tree, 8, 1, ((".*", "fsdp"),), fsdp_min_size=32))
    assert specs["params/net/conv/bias"] == P("data")
    specs = _flat_specs(tree, mesh_lib.state_specs(tree, 8, 1, ((".*", "fsdp"),)))  # default 2**18: all small
    assert set(specs.values()) == {P()}


def test_model_rules_first_match_wins_and_default_is_the_old_behaviour():
    tree = _tree()
    # '/conv/kernel$' names the module, so it also matches the Adam moments (opt_state/net/1/0/mu/conv/kernel)
    rules = (
        (r"/conv/kernel$", "model:-2"),  # [3, 3, 16, 32]: input channels over 'model'
        (r"conv/", "replicate"),  # never reached for conv/kernel, reached for conv/bias
        (r"dense/kernel$", "fsdp+model:0"),
        (r"wide/kernel$", "fsdp+model:-1"),
        (r"^params/disc/", "model:0"),
    )
    specs = _flat_specs(tree, mesh_lib.state_specs(tree, data=4, model=2, rules=rules, fsdp_min_size=0))
    assert specs["params/net/conv/kernel"] == P(None, None, "model", None)
    assert specs["opt_state/net/1/0/mu/conv/kernel"] == P(None, None, "model", None)
    assert specs["params/net/conv/bias"] == P()
    assert specs["params/net/dense/kernel"] == P("model", "data")
    assert specs["params/net/wide/kernel"] == P("data", "model")  # 40 over 'model', then 48 over 'data'
    assert specs["params/disc/head/kernel"] == P("model", None)
    # leaves matching no rule: last axis over 'model' when it divides (as before the rules existed)
    assert specs["params/net/odd/kernel"] == P(None, "model")
    assert specs["params/net/prime/kernel"] == P()
    assert specs["rng"] == P() and specs["step"] == P()

    def old_rule(shape, model):  # research/train/mesh.py before sharding_rules
        return (
            P(*([None] * (len(shape) - 1)), "model")
            if model > 1 and len(shape) >= 2 and shape[-1] % model == 0
            else P()
        )

    for model in (1, 2):
        mesh = mesh_lib.make_mesh(model)
        shardings = mesh_lib.state_shardings(mesh, tree)  # the two-argument call still works
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings)):
            assert sh.spec == old_rule(leaf.shape, model), mesh_lib.path_name(path)
            assert sh.mesh is mesh


def test_model_rule_errors_name_the_leaf():
    tree = _tree()
    with pytest.raises(ValueError, match=r"'model:-1'.*'params/net/prime/kernel' \(shape \(7, 9\)\).*size 2"):
        mesh_lib.state_specs(tree, 4, 2, ((r"^params/.*prime", "model:-1"),))
    with pytest.raises(
        ValueError,
        match=r"names axis 2 of 'opt_state/net/1/0/mu/dense/kernel', which has shape "
        r"\(64, 64\)",
    ):
        mesh_lib.state_specs(tree, 4, 2, ((r"dense", "model:2"),))


def test_check_rules_rejects_bad_regex_and_unknown_rules():
    with pytest.raises(ValueError, match=r"sharding_rules\[1\]: invalid regex 'block\('"):
        mesh_lib.check_rules(((".*kernel", "fsdp"), ("block(", "fsdp")))
    with pytest.raises(ValueError, match=r"sharding_rules\[0\]: unknown rule 'fsdp2' for 'x'.*replicate, fsdp"):
        mesh_lib.check_rules((("x", "fsdp2"),))
    with pytest.raises(ValueError, match=r"unknown rule 'model:a'"):
        mesh_lib.check_rules((("x", "model:a"),))
    with pytest.raises(ValueError, match=r"sharding_rules\[0\]=\('x',\) is not a \(regex, rule\) pair"):
        mesh_lib.check_rules((("x",),))
    parsed = mesh_lib.check_rules(((".*", "fsdp+model:-2"), ("a", "replicate")))
    assert [(r.fsdp, r.model_axis) for r in parsed] == [(True, -2), (False, None)]
    # one-switch forms: a bare rule name or a single pair means that rule for every leaf
    for short in ("fsdp", (".*", "fsdp")):
        (rule,) = mesh_lib.check_rules(short)
        assert rule.fsdp and rule.model_axis is None and rule.pattern.pattern == ".*"


def test_rules_from_config_overrides(tiny_config):
    cfg = apply_overrides(
        tiny_config,
        [("train.sharding_rules", "(('disc', 'replicate'), ('.*', 'fsdp'))"), ("train.fsdp_min_size", "100")],
    )
    assert cfg.train.sharding_rules == (("disc", "replicate"), (".*", "fsdp"))
    tree = _tree()
    mesh = mesh_lib.make_mesh(1)
    specs = _flat_specs(
        tree, jax.tree.map(lambda s: s.spec, mesh_lib.state_shardings_from_config(mesh, tree, cfg.train))
    )
    assert specs["params/net/dense/kernel"] == P(None, "data")
    assert specs["params/net/odd/kernel"] == P(None, "data")  # 192 >= 100
    assert specs["params/net/conv/bias"] == P()  # 32 < 100
    assert specs["params/disc/head/kernel"] == P()
    # base config: no rules, the previous behaviour
    default = mesh_lib.state_shardings_from_config(mesh, tree, tiny_config.train)
    assert {s.spec for s in jax.tree.leaves(default)} == {P()}


def test_describe_shardings_counts_bytes_per_device():
    tree = _tree()
    mesh = mesh_lib.make_mesh(2)  # data 4 x model 2
    shardings = mesh_lib.state_shardings(
        mesh, tree, ((r"conv/kernel", "fsdp+model:-1"), (".*", "replicate")), fsdp_min_size=0
    )
    table = mesh_lib.describe_shardings(tree, shardings)
    row = next(line for line in table.splitlines() if line.startswith("params/net/conv/kernel "))
    # [3, 3, 16, 32] float32: 32 over 'model' (2), 16 over 'data' (4) -> 3*3*4*16 elements per device
    assert row.split()[-1] == str(3 * 3 * 4 * 16 * 4) and "P(None, None, 'data', 'model')" in row
    assert "opt_state/net/1/0/mu/conv/kernel" in table
    sizes = [int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)]
    conv = 3 * 3 * 16 * 32 * 4
    expected = sum(sizes) - 2 * conv + 2 * conv // 8  # params and mu copies of the conv kernel
    assert mesh_lib.state_bytes_per_device(tree, shardings) == expected
    assert f"state per device: {expected} bytes" in table.splitlines()[-1]
    assert f"whole state {sum(sizes)} bytes" in table


# -- a diffusion training step, sharded by rules, against one device ------------------------------------------------


def _step_program(trainer, train_config):
    """The trainer's step, after checking that build_trainer placed the state by train.sharding_rules."""
    sh = mesh_lib.state_shardings_from_config(trainer.mesh, trainer.abstract_state, train_config)
    assert [s.spec for s in jax.tree.leaves(trainer.state_sharding)] == [s.spec for s in jax.tree.leaves(sh)]
    return trainer.step, sh


def _run(trainer, train_config, init_state, batches):
    """Steps from a host copy of the initial state (the same numbers on every mesh), placed by the rules."""
    step, sh = _step_program(trainer, train_config)
    state = jax.device_put(init_state, sh)
    losses = []
    for b in batches:
        state, metrics = step(state, mesh_lib.global_batch(b, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses), sh


def _assert_close(a, b):
    pa, pb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(pa) == len(pb)
    for (path, x), y in zip(pa, pb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=mesh_lib.path_name(path))


@pytest.fixture
def single_device_run(tiny_config):
    it = make_train_iterator(tiny_config.data, global_batch_size=16, seed=0)
    batches = [next(it) for _ in range(3)]
    trainer = build_trainer(tiny_config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    init_state = jax.device_get(trainer.init(jax.random.PRNGKey(0)))
    state, losses, _ = _run(trainer, tiny_config.train, init_state, batches)
    return batches, init_state, jax.device_get(state), losses


@pytest.mark.parametrize(
    "mesh_model,rules",
    [
        (1, "(('.*', 'fsdp'),)"),
        (2, "(('conv_out', 'fsdp'), ('.*', 'fsdp+model:-1'))"),  # conv_out has 1 output channel: not split
    ],
)
def test_rule_sharded_step_equals_single_device(tiny_config, single_device_run, mesh_model, rules):
    batches, init_state, ref_state, ref_losses = single_device_run
    cfg = apply_overrides(
        tiny_config,
        [("train.sharding_rules", rules), ("train.fsdp_min_size", "32"), ("train.mesh_model", str(mesh_model))],
    )
    trainer = build_trainer(cfg, mesh_lib.make_mesh(mesh_model, jax.devices()[:8]))
    data = 8 // mesh_model
    assert trainer.mesh.shape == {"data": data, "model": mesh_model}
    state, losses, sh = _run(trainer, cfg.train, init_state, batches)

    # The parameters really are split: every weight of >= 1024 elements (all kernels but conv_in/conv_out, whose
    # 144 elements have no axis divisible by 8) holds 1/8 of its elements on each device, its Adam moments too.
    split, total = 0, 0
    for name, tree in (("params", state.params), ("ema", state.ema_params)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shard = leaf.addressable_shards[0].data.shape
            total += leaf.size
            if leaf.size >= 1024:
                assert int(np.prod(shard)) * 8 == leaf.size, (name, mesh_lib.path_name(path), leaf.shape, shard)
                assert "data" in leaf.sharding.spec and (mesh_model == 1 or "model" in leaf.sharding.spec)
            split += leaf.size - int(np.prod(shard))
    assert split > 0.7 * total
    mu_big = [x for x in jax.tree.leaves(state.opt_state) if x.size >= 1024]
    assert mu_big and all(int(np.prod(x.addressable_shards[0].data.shape)) * 8 == x.size for x in mu_big)
    assert (
        mesh_lib.state_bytes_per_device(trainer.abstract_state, sh)
        < mesh_lib.state_bytes_per_device(
            trainer.abstract_state, jax.tree.map(lambda s: mesh_lib.replicated(trainer.mesh), sh)
        )
        / 4
    )

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    state = jax.device_get(state)
    _assert_close(ref_state.params, state.params)
    _assert_close(ref_state.ema_params, state.ema_params)
    _assert_close(ref_state.opt_state, state.opt_state)
    # training moved the parameters, so the comparison is not between two copies of the initialisation
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), init_state.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_frozen_parts_follow_the_rules_under_their_own_prefix():
    mesh = mesh_lib.make_mesh(1, jax.devices()[:8])
    teacher = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros((32,))}}
    cfg = apply_overrides(
        _config_with_rules("(('^frozen/teacher/', 'fsdp'), ('.*', 'fsdp'))"), [("train.fsdp_min_size", "64")]
    )
    specs = jax.tree.map(lambda s: s.spec, mesh_lib.frozen_shardings(mesh, "teacher", teacher, cfg.train))
    assert specs == {"conv": {"kernel": P(None, None, None, "data"), "bias": P()}}
    # Only rules naming frozen/... reach frozen parts' paths; without one a frozen leaf is replicated, whatever
    # the default of the state's leaves.
    other = apply_overrides(_config_with_rules("(('^params/', 'fsdp'),)"), [("train.mesh_model", "2")])
    mesh2 = mesh_lib.make_mesh(2, jax.devices()[:8])
    specs = jax.tree.map(lambda s: s.spec, mesh_lib.frozen_shardings(mesh2, "base", teacher, other.train))
    assert specs == {"conv": {"kernel": P(), "bias": P()}}


def _config_with_rules(rules):
    from tests.factories import make_tiny_config

    return apply_overrides(make_tiny_config(), [("train.sharding_rules", rules)])
