"""The import structure: no cycles, a library apart from the harness, a light
``import cdat_fast`` whose submodules are reachable as attributes.

The import graph is read from the sources with ``ast``: every ``import`` and
``from ... import`` statement of a module, at module level or inside a
function or class, relative imports resolved. ``kernels/`` is installed as the
package ``cdat_fast.kernels`` (pyproject's ``package-dir``). An edge goes to
the most specific module of the package that the statement names
(``from cdat_fast import nn`` is an edge to ``cdat_fast.nn``, ``from
cdat_fast import cdat`` one to ``cdat_fast.cdat``, ``import cdat_fast`` one to
``cdat_fast``); the parent packages Python imports on the way are not edges.
Imports by computed name (``importlib.import_module``) are not seen: the
package's lazy attributes (``cdat_fast.__getattr__``) are such imports, and
run only on access.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Source folder -> the package it is installed as.
PACKAGES = {ROOT / "cdat_fast": "cdat_fast", ROOT / "kernels": "cdat_fast.kernels"}
HARNESS = "cdat_fast.harness"
LAZY = ("nn", "kernels", "sharding", "theory", "estimators", "diagnostics",
        "harness", "curvature")
HEAVY = ("matplotlib", "orbax", "sklearn", "tqdm")


# -- the graph -------------------------------------------------------------------

def module_files(packages: dict[pathlib.Path, str]) -> dict[str, pathlib.Path]:
  """``{module name: source file}`` of every module under the folders."""
  modules = {}
  for folder, package in packages.items():
    for path in sorted(folder.rglob("*.py")):
      parts = list(path.relative_to(folder).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      modules[".".join([package, *parts])] = path
  return modules


def _known(name: str, modules) -> str | None:
  """The longest prefix of the dotted ``name`` that is one of ``modules``."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def _imported(node: ast.AST, module: str, is_package: bool, modules) -> set[str]:
  """The modules of ``modules`` that one import statement imports."""
  if isinstance(node, ast.Import):
    found = {_known(alias.name, modules) for alias in node.names}
    return found - {None}
  if node.level:  # relative: from the module's package, level - 1 up
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
      package = package.rpartition(".")[0]
    base = f"{package}.{node.module}" if node.module else package
  else:
    base = node.module
  found = set()
  for alias in node.names:
    found.add(_known(f"{base}.{alias.name}", modules) or _known(base, modules))
  return found - {None}


def import_graph(packages: dict[pathlib.Path, str]) -> dict[str, set[str]]:
  """``{module: modules it imports}``, module- and function-level alike."""
  modules = module_files(packages)
  graph = {}
  for module, path in modules.items():
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges |= _imported(node, module, is_package, modules)
    graph[module] = edges - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle ``[a, b, ..., a]`` of the graph, or None."""
  state: dict[str, str] = {}  # "open" while on the path, then "done"
  path: list[str] = []

  def visit(node):
    state[node] = "open"
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


@pytest.fixture(scope="module")
def graph():
  return import_graph(PACKAGES)


def _write(folder: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_the_graph_resolves_relative_and_function_level_imports(tmp_path):
  _write(tmp_path / "pkg", {
      "__init__.py": "from pkg.a import f\n",
      "a.py": "def f():\n  from . import b\n",
      "b.py": "from .sub.c import g\nimport os\n",
      "sub/__init__.py": "from .. import b\n",
      "sub/c.py": "from ..a import f\nfrom pkg import sub\n",
  })
  _write(tmp_path / "ext", {"__init__.py": "from .d import h\n",
                            "d.py": "def h():\n  import pkg.a\n"})
  g = import_graph({tmp_path / "pkg": "pkg", tmp_path / "ext": "pkg.ext"})
  assert g == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"},
               "pkg.sub": {"pkg.b"}, "pkg.sub.c": {"pkg.a", "pkg.sub"},
               "pkg.ext": {"pkg.ext.d"}, "pkg.ext.d": {"pkg.a"}}
  assert find_cycle(g) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
  assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_the_graph_covers_the_package(graph):
  assert "cdat_fast.kernels.dense_jet" in graph
  assert "cdat_fast.kernels.lowering" in graph["cdat_fast.kernels.dense_jet"]
  assert "cdat_fast.kernels" in graph["cdat_fast.nn"]
  assert "cdat_fast.harness.config" in graph["cdat_fast.harness.checkpoint"]
  assert "cdat_fast.nn" in graph["cdat_fast.harness.models"]  # in a function


def test_no_import_cycle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_harness(graph):
  offenders = {
      module: sorted(m for m in imports
                     if m == HARNESS or m.startswith(HARNESS + "."))
      for module, imports in graph.items()
      if not (module == HARNESS or module.startswith(HARNESS + "."))}
  offenders = {m: i for m, i in offenders.items() if i}
  assert not offenders, f"library modules importing {HARNESS}: {offenders}"


# -- import cdat_fast --------------------------------------------------------------

def _fresh_python(code: str) -> str:
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  return done.stdout


def test_import_cdat_fast_is_light_and_its_submodules_are_attributes():
  out = _fresh_python(f"""
      import sys
      import cdat_fast
      heavy = [m for m in {HEAVY!r} if m in sys.modules]
      print("heavy", heavy)
      missing = [m for m in {LAZY!r} if m not in dir(cdat_fast)]
      print("missing from dir", missing)
      layer = cdat_fast.nn.Dense(4)
      print("dense", type(layer).__module__, layer.features)
      print("kernel", callable(cdat_fast.kernels.dense_jet))
      print("still light", [m for m in {HEAVY!r} if m in sys.modules])
      """)
  assert "heavy []" in out
  assert "missing from dir []" in out
  assert "dense cdat_fast.nn 4" in out
  assert "kernel True" in out
  assert "still light []" in out


def test_the_lazy_submodules_are_the_modules():
  import importlib
  import cdat_fast
  for name in LAZY:
    assert getattr(cdat_fast, name) is importlib.import_module(
        f"cdat_fast.{name}")
  assert cdat_fast.nn.Dense(4).features == 4
  with pytest.raises(AttributeError, match="no_such_thing"):
    cdat_fast.no_such_thing  # noqa: B018


def test_the_package_exports_what_it_did():
  import cdat_fast
  exported = {
      "BacktrackingState", "CDATState", "HypergradientState", "PolyakState",
      "SharpnessResult", "SharpnessRuleState", "TunedState",
      "backtracking_linesearch", "cdat", "directional_derivatives", "hvp",
      "hypergradient", "on_edge", "polyak", "preconditioner_from_state",
      "quadratic_greedy", "scale_by_backtracking_linesearch", "scale_by_cdat",
      "scale_by_hypergradient", "scale_by_polyak", "scale_by_sharpness_rule",
      "sharpness", "sharpness_rule", "tuned"}
  assert exported <= set(cdat_fast.__all__)
  for name in [*cdat_fast.__all__, "__version__"]:
    assert hasattr(cdat_fast, name), name


def test_the_harness_config_is_importable_from_train():
  from cdat_fast.harness import config, train
  for name in ("TrainConfig", "FUSED_MODELS", "config_to_dict",
               "config_from_dict"):
    assert getattr(train, name) is getattr(config, name)
