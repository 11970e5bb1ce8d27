"""shell/exercises.py, the course kit's tool: blanking keeps a function's signature and docstring and nothing of
its body, every exercise names a function and tests that exist (and docs/exercises.md lists the same), bad input
is one line and exit 2, and `check` catches a grading test that passes on a blank. The full check is CI's
(.ci/run), not this file's: it takes minutes."""
import re
from pathlib import Path

import pytest

from shell import exercises as ex

REPO = Path(__file__).resolve().parents[1]

TOY = '''"""A toy module."""
import functools


def helper(x):
    return x + 1


class Toy:
    @functools.lru_cache(maxsize=None)
    def method(self,
               x: int = 2) -> int:
        """Twice x, plus one.

        The contract stays."""
        # a comment that gives the answer away
        y = 2 * x
        return helper(y)

    def other(self):
        return "untouched"


def bare(x):
    return x * 3
# a comment after the last function
'''


def test_blank_keeps_the_signature_the_docstring_and_every_other_line():
    out = ex.blank(TOY, "Toy.method", "exercise 1 (toy): write Toy.method")
    lines, new = TOY.splitlines(), out.splitlines()
    raise_at = new.index('        raise NotImplementedError(\'exercise 1 (toy): write Toy.method\')')
    assert new[:raise_at] == lines[:raise_at]                      # decorator, signature, docstring: as they were
    assert new[raise_at + 1:] == lines[raise_at + 3:]              # the three body lines (comment included) gone
    assert "gives the answer" not in out and "2 * x" not in out
    namespace = {}
    exec(compile(out, "toy.py", "exec"), namespace)
    assert namespace["Toy"]().other() == "untouched" and namespace["helper"](1) == 2
    assert namespace["Toy"].method.__wrapped__.__doc__.startswith("Twice x")
    with pytest.raises(NotImplementedError, match=r"exercise 1 \(toy\)"):
        namespace["Toy"]().method(3)
    bare = ex.blank(TOY, "bare", "exercise 2")                     # no docstring: the whole body goes
    assert "x * 3" not in bare and "    raise NotImplementedError('exercise 2')\n" in bare
    assert bare.endswith("# a comment after the last function\n")
    for missing in ("Toy.nothing", "nothing", "Toy"):
        with pytest.raises(ex.ExerciseError):
            ex.blank(TOY, missing, "x")
    with pytest.raises(ex.ExerciseError, match="line of its def"):
        ex.blank("def f(x): return x\n", "f", "x")


def test_every_exercise_names_a_core_function_and_grading_tests_that_exist():
    assert len(ex.EXERCISES) >= 6 and len({e.id for e in ex.EXERCISES}) == len(ex.EXERCISES)
    core = {"data.py", "hypernet.py", "masks.py", "deepinversion.py", "federated.py", "train.py"}
    for e in ex.EXERCISES:
        assert e.file in core, e
        blanked = ex.blank((REPO / e.file).read_text(), e.function, "x")
        assert blanked != (REPO / e.file).read_text()
        assert e.tests
        for node in e.tests:
            path, name = node.split("::")
            assert path in {f"tests/test_{Path(c).stem}.py" for c in core}, node      # the core's own tests
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (REPO / path).read_text(), re.M), node


def test_docs_list_every_exercise_with_the_tests_that_grade_it():
    text = (REPO / "docs" / "exercises.md").read_text()
    sections = re.findall(r"^## (\d+)\. [^\n]*\(`([\w-]+)`\)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert [(int(n), i) for n, i, _ in sections] == [(ex.number(e), e.id) for e in ex.EXERCISES]
    for (_, _, body), e in zip(sections, ex.EXERCISES):
        listed = re.search(r"\*\*Graded by:\*\*\n```text\n(.*?)\n```", body, flags=re.S).group(1).split("\n")
        assert listed == list(e.tests), e.id
        assert f"`{e.file}`" in body and e.function.split(".")[-1] in body, e.id


@pytest.mark.parametrize("argv, says", [
    (["check", "--only", "nope"], "unknown exercise nope"),
    (["copy", "{dest}"], "exists and is not an empty folder"),
    ([], "required"),
    (["list", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, tmp_path, capsys):
    (tmp_path / "something").write_text("already here")
    assert ex.main([a.format(dest=tmp_path) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and says in err and err.count("\n") == 1 and "Traceback" not in err


def test_copy_blanks_the_chosen_exercises_only(tmp_path, capsys):
    dest = tmp_path / "course"
    assert ex.main(["copy", str(dest), "--only", "vjp", "9"]) == 0
    assert "3 vjp" in capsys.readouterr().out
    assert not (dest / ".git").exists() and (dest / "tests" / "conftest.py").exists()
    differ = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()
                    and p.read_bytes() != (REPO / p.relative_to(dest)).read_bytes())
    assert differ == ["federated.py", "train.py"]
    assert "raise NotImplementedError('exercise 3 (vjp): write pull_toward" in (dest / "federated.py").read_text()
    assert "def local_train" in (dest / "federated.py").read_text()


def test_check_catches_a_grading_test_that_passes_on_the_blank(tmp_path, monkeypatch, capsys):
    """A toy repository, no torch: one grading test needs the function, the other does not."""
    (tmp_path / "toy.py").write_text('def double(x):\n    """2 x."""\n    return 2 * x\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_toy.py").write_text(
        "import toy\n\ndef test_double():\n    assert toy.double(2) == 4\n\ndef test_nothing():\n    assert True\n")
    graded = ex.Exercise("double", "toy.py", "double", ("tests/test_toy.py::test_double",))
    lax = ex.Exercise("lax", "toy.py", "double", ("tests/test_toy.py::test_double", "tests/test_toy.py::test_nothing"))
    monkeypatch.setattr(ex, "EXERCISES", [graded, lax])
    assert not ex.check([graded, lax], root=tmp_path)
    solution, first, second, problem = capsys.readouterr().out.splitlines()
    assert solution.startswith("ok   the solution: 2 grading tests pass") and first.startswith("ok   1 double")
    assert second.startswith("FAIL 2 lax") and problem.strip() == "tests/test_toy.py::test_nothing passed on the blank"
    assert (tmp_path / "toy.py").read_text().endswith("return 2 * x\n")       # the solution is left alone
