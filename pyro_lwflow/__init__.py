"""pyro_lwflow: likelihood-weighted normalizing flows for Pyro models (arXiv:2512.04954)."""

from .draws import WeightedDraws
from .fit import FitResult, fit
from .guide import AutoLWFlow
from .loss import LikelihoodWeightedKL

__all__ = ["AutoLWFlow", "FitResult", "LikelihoodWeightedKL", "WeightedDraws", "fit"]
__version__ = "0.1.0"
