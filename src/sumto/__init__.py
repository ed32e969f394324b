"""sumto: learnable PyTorch weights that satisfy sum constraints by construction.

Constraint classes (``AffineSum``, ``Simplex``, ``BoxSum``) are parametrizations for
:mod:`torch.nn.utils.parametrize`; the lowercase helpers (``sum_to``, ``simplex``,
``box_sum``) register them on a module's tensor and return the module. Pure tensor
maps live in :mod:`sumto.functional`.
"""

from sumto import functional
from sumto._version import __version__
from sumto.constraints import AffineSum, BoxSum, Constraint, Simplex
from sumto.linear import LinearEquality, bayar, linear_equality
from sumto.nn import WeightedSum
from sumto.register import bake, box_sum, check, constrain, simplex, sum_to
from sumto.step import project_on_step
from sumto.transport import Transport, doubly_stochastic

__all__ = [
    "AffineSum",
    "BoxSum",
    "Constraint",
    "LinearEquality",
    "Simplex",
    "Transport",
    "WeightedSum",
    "__version__",
    "bake",
    "bayar",
    "box_sum",
    "check",
    "constrain",
    "doubly_stochastic",
    "functional",
    "linear_equality",
    "project_on_step",
    "simplex",
    "sum_to",
]
