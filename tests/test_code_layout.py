"""The codebase's own rules: small functions, no import cycles, a light import.

* No function in ``cdat_fast/``, ``kernels/`` or ``bench/`` has more than
  ``MAX_OWN_LINES`` lines of its own code: the lines its statements span,
  less its docstring, blank and comment-only lines, and the lines of the
  functions and classes nested in it (each counted on its own).
"""
from __future__ import annotations

import ast
import io
import pathlib
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "cdat_fast").rglob("*.py"),
                  *(ROOT / "kernels").rglob("*.py"),
                  *(ROOT / "bench").glob("*.py")])
MAX_OWN_LINES = 80


def _code_lines(source: str) -> set[int]:
  """Line numbers holding a token of code (no comments, blanks, docstrings)."""
  lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                    tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
      continue
    lines.update(range(tok.start[0], tok.end[0] + 1))
  return lines


def _docstring_lines(node) -> set[int]:
  body = getattr(node, "body", None)
  if body and isinstance(body[0], ast.Expr) and isinstance(
      body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
    return set(range(body[0].lineno, body[0].end_lineno + 1))
  return set()


def own_code_lines(node, code: set[int]) -> int:
  """Lines of ``node``'s own code: nested functions and classes excluded."""
  own = set(range(node.lineno, node.end_lineno + 1)) & code
  own -= _docstring_lines(node)
  for child in ast.walk(node):
    if child is not node and isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      own -= set(range(child.lineno, child.end_lineno + 1))
  return len(own)


def function_sizes(path: pathlib.Path) -> dict[str, int]:
  source = path.read_text()
  code = _code_lines(source)
  sizes = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      sizes[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = (
          own_code_lines(node, code))
  return sizes


def test_the_counter_counts_own_code_only():
  source = '''
def outer(x):
  """Doc
  string."""
  # a comment

  y = (x +
       1)
  def inner(z):
    return z
  return inner(y)
'''
  code = _code_lines(source)
  node = ast.parse(source).body[0]
  assert own_code_lines(node, code) == 4  # def, the 2-line y =, return
  assert own_code_lines(node.body[2], code) == 2


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_the_limit(path):
  long = {k: v for k, v in function_sizes(path).items() if v > MAX_OWN_LINES}
  assert not long, f"functions over {MAX_OWN_LINES} lines of own code: {long}"
