import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEST_COMMAND = "pip install -r requirements-test.txt && pip install --no-deps torch-fidelity==0.4.0 && pytest"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_snippet_runs_as_written(capsys):
    snippet = python_blocks()[0]
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 11  # the import line plus ten
    with jax.numpy_dtype_promotion("standard"):  # as a user runs it, without the suite's strict promotion
        exec(compile(snippet, str(README), "exec"), {})
    loss, nfe_euler, nfe_dopri5 = capsys.readouterr().out.split()
    assert float(loss) > 0 and int(nfe_euler) == 32 and int(nfe_dopri5) > 0


def test_readme_commands_are_the_documented_ones():
    text = README.read_text()
    assert "pip install -e . && python experiments/train_flow.py" in text
    assert TEST_COMMAND in text
    # CI makes its virtualenv and then runs exactly the README's command, so it sees what a newcomer sees
    ci = (README.parent / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == TEST_COMMAND
    assert not any("pip install" in line for line in commands[:-1] if "--upgrade pip" not in line)
    # the requirements file the command names is the one in the repository, and it pins torch's CPU build
    assert "torch==2.13.0" in (README.parent / "requirements-test.txt").read_text()
