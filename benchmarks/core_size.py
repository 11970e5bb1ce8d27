"""The core's size, as a student meets it: lines of code, with docstrings, the longest function, and the share of
engineering (what serves real use, not the method), per file and in all.

    python benchmarks/core_size.py            # this checkout
    python benchmarks/core_size.py --at ../before

Lines of code: not blank, not a comment, not part of a docstring. With docstrings: the same plus docstrings'
lines. Engineering: the lines of the functions named in ENGINEERING and the lines matching PATTERNS (a fault
counter, an autocast, a resume field, a one-line error for the user). The lists are ours, to be read and argued
with. Targets (issue 41): at most 750 lines of code, 1,000 with docstrings, no function over 50 lines, engineering
under 10 %. A mirror, not a gate: it prints, it never fails.
"""
import argparse
import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = ["data.py", "hypernet.py", "masks.py", "deepinversion.py", "federated.py", "train.py"]
ENGINEERING = {"data.py": ["train_shards", "DataError"], "train.py": ["Hooks"]}
PATTERNS = re.compile(r"faults|\bamp\b|autocast|stage_elapsed|DataError\(|isfinite|steps_trained|_seconds")


def line_kinds(text):
    """(code lines, docstring lines): sets of 1-based line numbers."""
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings |= set(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code |= set(range(tok.start[0], tok.end[0] + 1))
    return code - docstrings, docstrings


def functions(tree):
    """{qualified name: (first line, last line)} of every function and class."""
    found = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                found[prefix + child.name] = (child.lineno, child.end_lineno, isinstance(child, ast.FunctionDef))
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)
    walk(tree, "")
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--at", default=str(REPO), help="the checkout to count (default: this one)")
    root = Path(p.parse_args().at)
    totals = [0, 0, 0]
    longest = (0, "")
    print("| file | lines of code | with docstrings | engineering | longest function |")
    print("|---|---|---|---|---|")
    for name in CORE:
        if not (root / name).exists():
            continue
        text = (root / name).read_text()
        code, docs = line_kinds(text)
        spans = functions(ast.parse(text))
        engineering = set()
        for qualified in ENGINEERING.get(name, []):
            if qualified in spans:
                engineering |= set(range(spans[qualified][0], spans[qualified][1] + 1))
        engineering |= {k + 1 for k, line in enumerate(text.splitlines()) if PATTERNS.search(line)}
        engineering &= code
        sizes = {q: len(code & set(range(a, b + 1))) for q, (a, b, is_function) in spans.items() if is_function}
        biggest = max(sizes, key=sizes.get) if sizes else ""
        if sizes and sizes[biggest] > longest[0]:
            longest = (sizes[biggest], f"{name}:{biggest}")
        totals = [totals[0] + len(code), totals[1] + len(code | docs), totals[2] + len(engineering)]
        print(f"| {name} | {len(code)} | {len(code | docs)} | {len(engineering)} ({len(engineering) / len(code):.1%}) "
              f"| {biggest} ({sizes.get(biggest, 0)}) |")
    print(f"| core | {totals[0]} | {totals[1]} | {totals[2]} ({totals[2] / totals[0]:.1%}) | {longest[1]} ({longest[0]}) |")
    print(f"\ntargets: lines of code {totals[0]} <= 750, with docstrings {totals[1]} <= 1000, longest function "
          f"{longest[0]} <= 50, engineering {totals[2] / totals[0]:.1%} < 10 %")


if __name__ == "__main__":
    main()
