"""pyro_lwflow: likelihood-weighted normalizing flows for Pyro models (arXiv:2512.04954)."""

from .amortized import AmortizedCheck, AmortizedLWFlow, AmortizedPosterior, amortize
from .arviz import to_arviz
from .calibration import Calibration, calibrate
from .draws import WeightedDraws
from .fit import FitResult, fit
from .guide import AutoLWFlow
from .io import load, save
from .loss import LikelihoodWeightedKL
from .schedule import RoundSummary, Schedule

__all__ = [
    "AmortizedCheck", "AmortizedLWFlow", "AmortizedPosterior", "AutoLWFlow", "Calibration", "FitResult",
    "LikelihoodWeightedKL", "RoundSummary", "Schedule", "WeightedDraws", "amortize", "calibrate", "fit", "load", "save",
    "to_arviz",
]
__version__ = "0.1.0"
