"""normjax: keep the weights of JAX models inside norm balls.

Every constraint exists as a pure, jit-able projection over a parameter pytree
(``project_*``) and as an optax ``GradientTransformation`` that goes last in
``optax.chain(optimizer, ...)``.
"""

from normjax._norms import band_project, unit_norms
from normjax._project import project_max_norm, project_min_max_norm, project_unit_norm
from normjax._select import path_str
from normjax._transforms import NormState, max_norm, min_max_norm, unit_norm

__version__ = "0.1.0"

__all__ = [
    "NormState",
    "band_project",
    "max_norm",
    "min_max_norm",
    "path_str",
    "project_max_norm",
    "project_min_max_norm",
    "project_unit_norm",
    "unit_norm",
    "unit_norms",
]
