"""Course exercises cut from the core (issue 43): the student's copy, and the proof that the tests grade it.

    python -m shell.exercises list [--nodes] [--only ID ...]   # the exercises, their functions and grading tests
    python -m shell.exercises copy DEST [--only ID ...]        # a copy of the repository with those bodies blanked
    python -m shell.exercises check [--only ID ...]            # every grading test fails on the blank, passes as is

docs/exercises.md says what each exercise asks. A blanked function keeps its signature and its docstring (the
contract); its body becomes `raise NotImplementedError("exercise N (ID): ...")`, found with `ast`, so the rest of
the file is left byte for byte. The copy holds what git would commit (tracked files and untracked ones git does
not ignore): no .git, so no history to read the solution from, and no runs/, data/ or caches. `check` passes
only if each grading test, on its own, fails on its exercise's blank (a test that passes there grades nothing)
and passes on the solution: the solution runs once in a scratch copy, and each blank is written into that copy
and taken back out, so a blank's run differs from the solution's by that one file alone. The core never
imports this module.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Exercise:
    id: str
    file: str           # relative to the repository root
    function: str       # its qualname in that file: `pull_toward`, `Client.local_train`
    tests: tuple        # the pytest node ids that grade it


EXERCISES = [
    Exercise("partition", "data.py", "partition", (
        "tests/test_data.py::test_pathological[10-2]", "tests/test_data.py::test_pathological[30-4]",
        "tests/test_data.py::test_dirichlet[0.1-20]", "tests/test_data.py::test_val_fraction_zero",
        "tests/test_data.py::test_partition_is_seeded",
        "tests/test_data.py::test_tiny_dataset_clients_get_the_promised_class_mix")),
    Exercise("local-train", "federated.py", "Client.local_train", (
        "tests/test_federated.py::test_local_training_lowers_the_clients_loss_on_its_training_data",
        "tests/test_federated.py::test_local_train_uploads_counts_not_data_and_keeps_frozen_weights",
        "tests/test_federated.py::test_the_same_generator_draws_the_same_training")),
    Exercise("vjp", "federated.py", "pull_toward", (
        "tests/test_federated.py::test_server_update_direction_is_the_pull_toward_the_trained_weights",
        "tests/test_federated.py::test_server_update_moves_generated_weights_toward_trained_weights")),
    Exercise("gate-step", "masks.py", "BatchGates.step", (
        "tests/test_masks.py::test_gate_step_moves_only_its_own_batch_row_and_clamps_it",
        "tests/test_masks.py::test_gate_step_follows_the_task_gradient",
        "tests/test_masks.py::test_gate_step_is_hats_compensated_step_with_each_term_normalised",
        "tests/test_masks.py::test_masks_learn_a_large_penalty_switches_units_off",
        "tests/test_masks.py::test_the_core_onboards_a_second_batch_with_hard_gates")),
    Exercise("free-masks", "masks.py", "BatchGates.free_masks", (
        "tests/test_masks.py::test_free_masks_freeze_exactly_what_earlier_batches_read",
        "tests/test_masks.py::test_earlier_batches_weights_bitwise_unchanged_by_every_later_stage",
        "tests/test_masks.py::test_a_batch_that_finds_no_free_unit_still_learns_and_earlier_batches_stay_fixed")),
    Exercise("masked-adam", "masks.py", "ServerOptimizer.step", (
        "tests/test_masks.py::test_server_optimizer_is_adam_on_free_entries_and_never_moves_a_frozen_one",
        "tests/test_federated.py::test_absent_clients_embeddings_do_not_move_even_with_adams_momentum",
        "tests/test_masks.py::test_earlier_batches_weights_bitwise_unchanged_by_every_later_stage")),
    Exercise("bn-loss", "deepinversion.py", "bn_statistics_loss", (
        "tests/test_deepinversion.py::test_bn_statistics_loss_is_zero_on_matching_statistics_and_positive_otherwise",
        "tests/test_deepinversion.py::test_model_level_bn_loss_zero_when_running_stats_are_the_batch_stats",
        "tests/test_deepinversion.py::test_synthesis_lowers_bn_loss_and_removes_every_hook")),
    Exercise("fine-tune", "deepinversion.py", "fine_tune", (
        "tests/test_deepinversion.py::test_keep_own_keeps_the_point_of_the_path_that_best_explains_the_clients_held_out_own_dreams",
        "tests/test_deepinversion.py::test_the_papers_replay_asks_no_client_and_moves_only_the_tried_clients_embedding_row")),
    Exercise("metrics", "train.py", "metrics", (
        "tests/test_train.py::test_metrics_against_a_hand_made_accuracy_matrix",
        "tests/test_train.py::test_a_run_reports_pa_against_the_clients_trained_alone")),
]


class ExerciseError(Exception):
    """A one-line, user-facing problem (main prints it and exits 2)."""


def number(exercise):
    return EXERCISES.index(exercise) + 1


def chosen(ids):
    """The exercises named in `ids` (by id or number), all of them for none, in the order of EXERCISES."""
    if not ids:
        return list(EXERCISES)
    known = {e.id: e for e in EXERCISES} | {str(number(e)): e for e in EXERCISES}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ExerciseError(f"unknown exercise {', '.join(unknown)}; known: {', '.join(e.id for e in EXERCISES)}")
    wanted = {known[i] for i in ids}
    return [e for e in EXERCISES if e in wanted]


# --------------------------------------------------------------------------------------------------
# Blanking a function body
# --------------------------------------------------------------------------------------------------

def find_function(tree, qualname):
    """The FunctionDef `qualname` (`Class.method` or `function`) of a module's ast, or ExerciseError."""
    scope = tree
    for part in qualname.split("."):
        found = [n for n in scope.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not found:
            raise ExerciseError(f"no {qualname} in the file (looked for {part})")
        scope = found[-1]           # the last definition of a name is the one Python keeps
    if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise ExerciseError(f"{qualname} is not a function")
    return scope


def blank(source, qualname, message):
    """`source` with the body of `qualname` replaced by `raise NotImplementedError(message)`; the decorators,
    signature and docstring stay, and every line outside the body is left as it was."""
    node = find_function(ast.parse(source), qualname)
    has_doc = ast.get_docstring(node, clean=False) is not None
    first = node.body[0]
    if first.lineno == node.lineno:
        raise ExerciseError(f"{qualname} has its body on the line of its def: nothing to blank apart")
    start = first.end_lineno + 1 if has_doc else first.lineno     # 1-based, the first line replaced
    lines = source.splitlines(keepends=True)
    body = [" " * first.col_offset + f"raise NotImplementedError({message!r})\n"]
    new = "".join(lines[:start - 1] + body + lines[node.end_lineno:])
    check = find_function(ast.parse(new), qualname)             # still Python, and the body is the raise alone
    assert isinstance(check.body[-1], ast.Raise) and len(check.body) == 1 + has_doc, qualname
    return new


def blank_file(root, exercise):
    path = Path(root) / exercise.file
    message = f"exercise {number(exercise)} ({exercise.id}): write {exercise.function}, see docs/exercises.md"
    path.write_text(blank(path.read_text(), exercise.function, message))


# --------------------------------------------------------------------------------------------------
# The copy
# --------------------------------------------------------------------------------------------------

def repository_files(root=REPO):
    """What git would commit: tracked files and untracked ones it does not ignore (a file deleted but still
    tracked is left out). Outside a git checkout (a student's copy), every file but caches, runs and data."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return sorted({f for f in listed if f and (Path(root) / f).is_file()})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "runs", "data", "__pycache__", ".pytest_cache"}
        return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(root).parts))


def write_copy(dest, exercises, root=REPO):
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExerciseError(f"{dest} exists and is not an empty folder; name a new one")
    files = repository_files(root)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(root) / name, dest / name)
    for exercise in exercises:
        blank_file(dest, exercise)
    return len(files)


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------

def run_tests(root, nodes, timeout=600):
    """{node: "passed" | "failed" | "skipped" | "not run"} of pytest on `nodes` in `root`, one thread."""
    report = Path(root) / ".exercise-report.xml"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root))
    try:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *nodes], cwd=root, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {node: f"not run (over {timeout} s)" for node in nodes}
    outcome = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            worst = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    worst = "failed"
                elif child.tag == "skipped" and worst == "passed":
                    worst = "skipped"
            outcome[(case.get("classname"), case.get("name"))] = worst
        report.unlink()

    def key(node):          # tests/test_x.py::Class::test[param] -> ("tests.test_x.Class", "test[param]")
        path, *rest = node.split("::")
        return ".".join([path.removesuffix(".py").replace("/", ".")] + rest[:-1]), rest[-1]
    return {node: outcome.get(key(node), "not run") for node in nodes}


def check(exercises, root=REPO):
    """One line per exercise, one for the solution; True if every grading test failed on its exercise's blank
    and passed on the solution. One scratch copy: each blank is written into it and taken back out."""
    all_good = True
    with tempfile.TemporaryDirectory(prefix="exercises-") as scratch:
        write_copy(scratch, [], root)
        nodes = list(dict.fromkeys(node for e in exercises for node in e.tests))
        began = time.perf_counter()
        # The solution once for every exercise: a pytest process costs seconds before its first test runs.
        problems = [f"{node} {outcome} on the solution" for node, outcome in run_tests(scratch, nodes).items()
                    if outcome != "passed"]
        report(not problems, f"the solution: {len(nodes)} grading tests pass", began, problems)
        all_good &= not problems
        for exercise in exercises:
            began, solution = time.perf_counter(), (Path(scratch) / exercise.file).read_text()
            blank_file(scratch, exercise)
            try:
                outcomes = run_tests(scratch, exercise.tests)
            finally:
                (Path(scratch) / exercise.file).write_text(solution)
            problems = [f"{node} {outcome} on the blank" for node, outcome in outcomes.items() if outcome != "failed"]
            report(not problems, f"{number(exercise)} {exercise.id:<12} {exercise.file}: {exercise.function}, "
                   f"{len(exercise.tests)} tests fail on the blank", began, problems)
            all_good &= not problems
    return all_good


def report(good, what, began, problems):
    print(f"{'ok  ' if good else 'FAIL'} {what:<88} {time.perf_counter() - began:5.1f} s", flush=True)
    for problem in problems:
        print(f"     {problem}", flush=True)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):             # one line, not argparse's usage block
        raise ExerciseError(message)


def main(argv=None):
    parser = Parser(prog="python -m shell.exercises", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="list|copy|check")
    listing = commands.add_parser("list", help="the exercises, their functions and grading tests")
    copy = commands.add_parser("copy", help="write a student's copy with the exercises' bodies blanked")
    copy.add_argument("dest", help="a new or empty folder")
    checking = commands.add_parser("check", help="every grading test fails on its blank, passes as is")
    for sub in (listing, copy, checking):
        sub.add_argument("--only", nargs="+", metavar="ID", help="these exercises (id or number) only")
    listing.add_argument("--nodes", action="store_true", help="the grading tests' node ids alone, one a line "
                         "(python -m pytest -q $(python -m shell.exercises list --nodes --only ID))")
    try:
        args = parser.parse_args(argv)
        exercises = chosen(getattr(args, "only", None))
        if args.command == "list" and args.nodes:
            print("\n".join(dict.fromkeys(node for e in exercises for node in e.tests)))
        elif args.command == "list":
            for e in exercises:
                print(f"{number(e)} {e.id:<12} {e.file}: {e.function}\n" + "".join(f"    {t}\n" for t in e.tests),
                      end="")
        elif args.command == "copy":
            files = write_copy(args.dest, exercises)
            print(f"wrote {files} files to {args.dest}; blanked:")
            for e in exercises:
                print(f"  {number(e)} {e.id:<12} {e.file}: {e.function}")
            print("a student grades exercise ID with: python -m pytest -q $(python -m shell.exercises list --nodes "
                  "--only ID)")
        else:
            return 0 if check(exercises) else 1
        return 0
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
