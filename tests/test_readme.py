"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NNX_PAGE = README.parent / "docs" / "nnx.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].startswith('pip install ".[mnist]" &&') and "dlrt_jax.train_mnist" in first[0]
    assert first[1].startswith('pip install -e ".[dev]" &&') and "pytest" in first[1]


def test_regression_example_trains_with_every_integrator(capsys):
    exec(compile(_blocks()[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        loss = float(re.search(r"loss ([0-9.e+-]+)", line).group(1))
        assert loss < 1e-7, line  # starts near 29; every integrator converges (1e-11 .. 1e-9)


def test_nnx_example_trains_evaluates_and_checkpoints(capsys):
    """issue 17, problem 5: the NNX block left the training step as a comment."""
    from dlrt_jax.checkpoint import latest_step

    ns: dict = {}
    exec(compile(_blocks()[1], "README.md", "exec"), ns)
    out = capsys.readouterr().out
    before, after = (float(a) for a in re.findall(r"test accuracy ([0-9.]+)", out))
    assert before < 0.4 and after > 0.7, out  # chance is 0.25
    assert "to_low_rank: 1 layer(s) converted" in out
    assert latest_step(ns["checkpoints"]) == 200
    # the checkpoint restores into a freshly converted model and optimiser
    dnnx, nnx = ns["dnnx"], ns["nnx"]
    model = dnnx.to_low_rank(
        nnx.Sequential(
            nnx.Linear(64, 128, rngs=nnx.Rngs(5)), nnx.relu, nnx.Linear(128, 4, rngs=nnx.Rngs(6))
        ),
        filter="layers/0",
        rank=16,
    )
    optimizer = nnx.Optimizer(model, ns["tx"], wrt=nnx.Param)
    assert dnnx.restore_checkpoint(ns["checkpoints"], model, optimizer) == 200
    restored = ns["accuracy"](model, ns["x_test"], ns["y_test"])
    assert restored == ns["accuracy"](ns["model"], ns["x_test"], ns["y_test"]) and restored > 0.7


def test_nnx_page_trains_resumes_converts_back_and_exports(capsys):
    """docs/nnx.md (issue 17, problem 5): every block runs in order, with its own assertions."""
    ns: dict = {}
    for i, code in enumerate(
        re.findall(r"^```python\n(.*?)^```$", NNX_PAGE.read_text(), re.S | re.M)
    ):
        exec(compile(code, f"docs/nnx.md:block{i}", "exec"), ns)
    assert i == 4  # build, train, resume, convert back, export
    assert ns["after"] > 0.7 and ns["done"] == 100
    assert ns["description"]["factors"].keys() == {"layers/0/kernel"}
    kinds = [type(m).__name__ for m in ns["plain"].layers[::2]]
    assert kinds == ["Linear", "Linear"], kinds
