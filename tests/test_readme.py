"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


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


def test_nnx_example_builds():
    exec(compile(_blocks()[1], "README.md", "exec"), {})
