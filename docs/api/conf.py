"""Sphinx configuration of the cdat-fast API reference.

Built by ``.ci/run`` with warnings as errors, so a broken docstring fails CI::

  sphinx-build -W --keep-going -b html docs/api build/docs/html

The package is imported, not mocked: autodoc needs ``cdat_fast`` (and
``cdat_fast.kernels``, which lives in ``kernels/`` and is mapped onto that name
by the ``package-dir`` of pyproject.toml) installed, e.g. ``pip install -e
".[docs]"``. No ``autodoc_mock_imports``: every import the documented modules
make at import time (jax, optax, flax, numpy) is a dependency of the package;
the harness imports matplotlib, orbax, scikit-learn and tqdm only inside the
functions that need them.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import textwrap

from sphinx.util import logging

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

# Importing jax must not grab an accelerator or spam the log while documenting.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
  import cdat_fast  # noqa: F401
  import cdat_fast.kernels  # noqa: F401
except ImportError as e:  # fail with the fix instead of a wall of autodoc errors
  raise RuntimeError(
      f"cannot import cdat_fast ({e}); install it first: "
      f'pip install -e "{_ROOT}[docs]"') from e

project = "cdat-fast"
author = "cdat-fast authors"
copyright = "cdat-fast authors"  # pylint: disable=redefined-builtin
release = version = cdat_fast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",   # Google-style Args:/Returns:/Raises: sections
    "sphinx.ext.mathjax",    # ``.. math::`` in docstrings (MathJax from a CDN when viewed)
    "sphinx.ext.viewcode",   # [source] links to highlighted module source
    "myst_parser",           # Markdown pages: README.md and docs/*.md via {include}
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

# The docstrings write code in double backquotes and use single backquotes
# only with a role (:func:`f`, :math:`x`). A bare `x`, as Markdown would write
# it, renders as code too instead of as an italic title reference.
default_role = "code"

# -- autodoc / napoleon ------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Type hints go into the parameter descriptions, not into very long signatures
# (optax.GradientTransformationExtraArgs, jax.typing.ArrayLike, ...).
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
# Type aliases shown by their name, as written in the source, instead of their
# expansion (``jax.typing.ArrayLike`` is an eight-member Union; ``PyTree`` is
# ``Any`` and says more than it).
autodoc_type_aliases = {
    "jax.typing.ArrayLike": "jax.typing.ArrayLike",
    "PyTree": "PyTree",
    "jax.Array": "jax.Array",  # the public name, as the source writes it
}
# Sphinx renders such an alias nested in another type (``int | ArrayLike``,
# ``Callable[[PyTree], Array]``) by the repr of its placeholder,
# "TypeAliasForwardRef('PyTree')"; make that repr the alias's name.
try:
  from sphinx.util.inspect import TypeAliasForwardRef as _AliasRef
  _AliasRef.__repr__ = lambda self: self.name
except ImportError:  # a Sphinx without it renders aliases its own way
  pass
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# Unresolved cross-references (e.g. to jax or optax types without
# intersphinx, which would need the network at build time) are not warnings:
# nitpicky stays off. reST errors in docstrings (bad indentation, unknown
# roles or directives, unterminated markup, bad math blocks) still are.
nitpicky = False

# -- MyST --------------------------------------------------------------------
myst_enable_extensions = ["dollarmath"]  # $math$, as GitHub renders it
# Anchors for the Markdown headings (h1-h3), so that links like
# ``[...](#command-line)`` in README.md and docs/*.md resolve.
myst_heading_anchors = 3

# No warning category is silenced (suppress_warnings stays empty): README.md
# and docs/*.md link only to headings (anchors above), web pages and, in
# docs/reproduction.md, figures, which its include rewrites relative to docs/
# (``:relative-docs: figures/`` in guides/reproduction.md) so that they resolve
# and are copied into the HTML as downloads.
suppress_warnings: list[str] = []

# -- HTML --------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"cdat-fast {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Curvature-aware learning-rate tuners for Optax",
    "fixed_sidebar": True,
}

# -- Class members --------------------------------------------------------------
# The fields of the NamedTuple states and of the flax modules are documented in
# their class docstring's ``Attributes:`` section (napoleon turns it into
# attribute entries). autodoc would list them a second time as members, with
# the docstring of whatever their default value is (``jnp.float32``'s, an
# initializer's, the NamedTuple's "Alias for field number N"): skip those.


def _skip_foreign_class_members(app, what, name, obj, skip, options):
  del app, name, options
  if skip or what != "class":
    return skip
  if type(obj).__name__ == "_tuplegetter":  # a NamedTuple field
    return True
  module = getattr(obj, "__module__", None)
  if isinstance(module, str) and not module.startswith("cdat_fast"):
    return True  # a field's default value from jax, numpy or flax
  return None


# -- Signatures of flax modules ----------------------------------------------
# A flax module's constructor is a generated dataclass ``__init__``: its
# defaults print as object reprs (``<function variance_scaling.<locals>.init>``)
# and it ends with flax's own ``parent`` and ``name``. Show the fields with
# their defaults as written in the class body instead.


def _field_defaults_from_source(cls) -> dict[str, str]:
  """``{field: default as written}`` for the class body's annotated fields."""
  try:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
  except (OSError, TypeError, SyntaxError):
    return {}
  body = tree.body[0].body if tree.body else []
  return {
      node.target.id: ast.unparse(node.value)
      for node in body
      if isinstance(node, ast.AnnAssign) and node.value is not None
      and isinstance(node.target, ast.Name)
  }


def _flax_module_signature(app, what, name, obj, options, signature,
                           return_annotation):
  del app, name, options
  if what != "class" or not inspect.isclass(obj):
    return None
  try:
    import flax.linen  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not issubclass(obj, flax.linen.Module):
    return None
  written = {}
  for klass in reversed(obj.__mro__):  # a subclass's defaults win
    if klass.__module__.startswith("cdat_fast"):
      written.update(_field_defaults_from_source(klass))
  params = []
  for p in inspect.signature(obj).parameters.values():
    if p.name in ("parent", "name"):
      continue
    if p.default is inspect.Parameter.empty:
      params.append(p.name)
    else:
      params.append(f"{p.name}={written.get(p.name, repr(p.default))}")
  return f"({', '.join(params)})", return_annotation


# jax.Array's implementation class prints as ``jax.jaxlib._jax.Array`` where
# an annotation is evaluated (napoleon's attribute types); name it jax.Array.
_PRIVATE_NAMES = {"jax.jaxlib._jax.Array": "jax.Array"}


def _public_type_names(app, what, name, obj, options, lines):
  del app, what, name, obj, options
  for i, line in enumerate(lines):
    for private, public in _PRIVATE_NAMES.items():
      line = line.replace(private, public)
    lines[i] = line


# -- Docstrings skipped while their files are rewritten ---------------------
# -- Public API completeness -------------------------------------------------
# Every name in ``cdat_fast.__all__`` must be documented as ``cdat_fast.NAME``
# (on tuners.rst); a new export without a page entry fails the build.
_logger = logging.getLogger(__name__)


def _check_public_api(app, env):
  del app
  documented = set(env.get_domain("py").objects)
  for module_name in ("cdat_fast",):
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
      if f"{module_name}.{name}" not in documented:
        _logger.warning(
            "%s.%s is in %s.__all__ but not documented in docs/api",
            module_name, name, module_name)


def setup(app):
  app.connect("autodoc-skip-member", _skip_foreign_class_members)
  app.connect("autodoc-process-signature", _flax_module_signature)
  # After napoleon (priority 500) has turned sections into reST.
  app.connect("autodoc-process-docstring", _public_type_names, priority=900)
  app.connect("env-check-consistency", _check_public_api)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
