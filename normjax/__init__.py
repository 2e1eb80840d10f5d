"""normjax: keep the weights of JAX models inside norm balls.

Every constraint exists as a pure, jit-able projection over a parameter pytree
(``project_*``) and as an optax ``GradientTransformation`` that goes last in
``optax.chain(optimizer, ...)``.
"""

from normjax._certify import (
    Certificate,
    NotCertifiable,
    OpBound,
    certified_accuracy,
    certified_radius,
    lipschitz_certificate,
)
from normjax._conv import (
    ConvSpec,
    conv_clip,
    conv_operator,
    conv_sigma_fft,
    conv_sigma_gram,
    conv_sigma_power,
    conv_sigma_svd,
    conv_spectral_norm,
    init_conv_power_vector,
)
from normjax._infer import infer_views
from normjax._norms import (
    band_project,
    clip_singular_values,
    init_power_vector,
    sigma_gram,
    sigma_power,
    sigma_svd,
    unit_norms,
)
from normjax._polar import (
    msign,
    orthogonalize,
    polar_schedule,
    spectral_clip,
    spectral_hammer,
    spectral_soft_cap,
)
from normjax._project import (
    lipschitz_bound,
    project_max_norm,
    project_min_max_norm,
    project_spectral_norm,
    project_unit_norm,
    spectral_norms,
)
from normjax._select import by_path, path_str
from normjax._viewtypes import Embedding, MatrixDims, NotMatrix
from normjax._transforms import (
    NormState,
    SpectralNormState,
    max_norm,
    min_max_norm,
    spectral_norm,
    unit_norm,
)

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "ConvSpec",
    "Embedding",
    "MatrixDims",
    "NormState",
    "NotCertifiable",
    "NotMatrix",
    "OpBound",
    "SpectralNormState",
    "band_project",
    "by_path",
    "certified_accuracy",
    "certified_radius",
    "clip_singular_values",
    "conv_clip",
    "conv_operator",
    "conv_sigma_fft",
    "conv_sigma_gram",
    "conv_sigma_power",
    "conv_sigma_svd",
    "conv_spectral_norm",
    "infer_views",
    "init_conv_power_vector",
    "init_power_vector",
    "lipschitz_bound",
    "lipschitz_certificate",
    "max_norm",
    "min_max_norm",
    "msign",
    "orthogonalize",
    "path_str",
    "polar_schedule",
    "project_max_norm",
    "project_min_max_norm",
    "project_spectral_norm",
    "project_unit_norm",
    "sigma_gram",
    "sigma_power",
    "sigma_svd",
    "spectral_clip",
    "spectral_hammer",
    "spectral_norm",
    "spectral_norms",
    "spectral_soft_cap",
    "unit_norm",
    "unit_norms",
]
