"""cdat-fast: curvature-aware learning-rate tuners for Optax.

CDAT (Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate
Tuners", NeurIPS 2024) and the baselines the paper studies, with exact
reference curvature and cheaper estimators.
"""
from cdat_fast.cdat import CDATState, cdat, on_edge, quadratic_greedy, scale_by_cdat
from cdat_fast.curvature import (SharpnessResult, directional_derivatives, hvp,
                                 preconditioner_from_state, sharpness)
from cdat_fast.hypergradient import (HypergradientState, hypergradient,
                                     scale_by_hypergradient)
from cdat_fast.linesearch import (BacktrackingState, backtracking_linesearch,
                                  scale_by_backtracking_linesearch)
from cdat_fast.polyak import PolyakState, polyak, scale_by_polyak
from cdat_fast.sharpness_rule import (SharpnessRuleState, scale_by_sharpness_rule,
                                      sharpness_rule)
from cdat_fast.tuned import TunedState, tuned

__version__ = "0.1.0"

__all__ = [
    "BacktrackingState", "CDATState", "HypergradientState", "PolyakState",
    "SharpnessResult", "SharpnessRuleState", "TunedState",
    "backtracking_linesearch", "cdat", "directional_derivatives", "hvp",
    "hypergradient", "on_edge", "polyak", "preconditioner_from_state",
    "quadratic_greedy", "scale_by_backtracking_linesearch", "scale_by_cdat",
    "scale_by_hypergradient", "scale_by_polyak", "scale_by_sharpness_rule",
    "sharpness", "sharpness_rule", "tuned",
]
