"""experiments/accelerator_check.py on CPU with --tiny networks: the table's arithmetic (MFU from model FLOPs, not
the recomputed ones), and that the full-size cases build the paper-sized networks."""

import jax
import pytest

from experiments import accelerator_check as ac


def test_tiny_cases_give_rows_with_model_flops_and_mfu(tmp_path, capsys):
    out = tmp_path / "table.md"
    args = ["--tiny", "--steps", "1", "--cases", "dit-xl2-bfloat16-full,sd15", "--peak-tflops", "2", "--out", str(out)]
    assert ac.main(args) == 0
    table = capsys.readouterr().out
    assert out.read_text().strip() in table
    assert (
        "| DiT-XL/2 256px | bfloat16 | full | 4 |" in table and "| SD 1.5 U-Net 512px | bfloat16 | none | 4 |" in table
    )

    case = next(c for c in ac.cases(tiny=True) if c.key == "dit-xl2-bfloat16-full")
    row = ac.run_case(case, steps=1, peak_tflops=2.0)
    # MFU counts the model's FLOPs: those of the step without remat, fewer than the remat program executes.
    init, plain, batch = ac._program(case, "none")
    _, remat, _ = ac._program(case, "full")
    state = init(jax.random.PRNGKey(0))
    arrays = {k: jax.numpy.zeros(v.shape, v.dtype) for k, v in batch.items()}
    model_flops = ac._flops(plain.lower(state, arrays).compile())
    assert ac._flops(remat.lower(state, arrays).compile()) > model_flops
    assert row["tflop_per_step"] == pytest.approx(model_flops / 1e12)
    assert row["mfu"] == pytest.approx(model_flops * row["steps_per_s"] / 2e12, rel=1e-6)
    assert row["images_per_s"] == pytest.approx(4 * row["steps_per_s"])
    assert 0 < row["peak_gib"] < 1

    with pytest.raises(SystemExit):  # argparse's error: the case keys are listed
        ac.main(["--tiny", "--cases", "nothing"])


def test_full_size_cases_are_the_paper_networks():
    """Traced only (nothing compiled or allocated): DiT-B/2 130M, DiT-XL/2 675M (DiT Table 4), the DDPM CIFAR-10
    U-Net 35.7M (Ho et al.), SD 1.5's U-Net 859.52M."""
    counts = {}
    for case in ac.cases():
        if case.remat != "none" or case.dtype != "bfloat16":
            continue
        init, _, batch = ac._program(case, "none")
        state = jax.eval_shape(init, jax.random.PRNGKey(0))
        counts[case.key.split("-bfloat16")[0]] = sum(x.size for x in jax.tree.leaves(state.params))
        assert batch["image"].shape[0] == case.batch
    assert counts["sd15"] == 859_520_964
    assert counts["dit-xl2"] == pytest.approx(675e6, rel=0.01)
    assert counts["dit-b2"] == pytest.approx(130e6, rel=0.01)
    assert counts["ddpm"] == pytest.approx(35.7e6, rel=0.01)
