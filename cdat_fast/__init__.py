"""cdat-fast: curvature-aware learning-rate tuners for Optax.

CDAT (Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate
Tuners", NeurIPS 2024) and the baselines the paper studies, with exact
reference curvature and cheaper estimators.

The submodules ``nn``, ``kernels``, ``sharding``, ``theory``, ``estimators``,
``diagnostics``, ``harness`` and ``curvature`` are attributes of the package, imported on first
access (``import cdat_fast; cdat_fast.nn.Dense(4)``), so that ``import
cdat_fast`` stays light (no matplotlib, orbax, scikit-learn or tqdm).
"""
import importlib as _importlib

from cdat_fast.cdat import CDATState, cdat, on_edge, quadratic_greedy, scale_by_cdat
from cdat_fast.curvature import (SharpnessResult, directional_derivatives, hvp,
                                 preconditioner_from_state, sharpness)
from cdat_fast.gen import GeNState, gen, scale_by_gen
from cdat_fast.hypergradient import (HypergradientState, hypergradient,
                                     scale_by_hypergradient)
from cdat_fast.linesearch import (BacktrackingState, backtracking_linesearch,
                                  scale_by_backtracking_linesearch)
from cdat_fast.polyak import PolyakState, polyak, scale_by_polyak
from cdat_fast.sharpness_rule import (SharpnessRuleState, scale_by_sharpness_rule,
                                      sharpness_rule)
from cdat_fast.tuned import TunedState, tuned

__version__ = "0.2.0"

# Imported on first access (PEP 562); see the module docstring.
_LAZY_SUBMODULES = ("curvature", "diagnostics", "estimators", "harness",
                    "kernels", "nn", "sharding", "theory")

__all__ = [
    "BacktrackingState", "CDATState", "GeNState", "HypergradientState",
    "PolyakState", "SharpnessResult", "SharpnessRuleState", "TunedState",
    "backtracking_linesearch", "cdat", "directional_derivatives", "gen", "hvp",
    "hypergradient", "on_edge", "polyak", "preconditioner_from_state",
    "quadratic_greedy", "scale_by_backtracking_linesearch", "scale_by_cdat",
    "scale_by_gen", "scale_by_hypergradient", "scale_by_polyak",
    "scale_by_sharpness_rule", "sharpness", "sharpness_rule", "tuned",
]


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *_LAZY_SUBMODULES})
