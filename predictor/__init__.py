"""Expert prediction for prefetching: trace windows, the learned model, baselines, metrics, live hook."""

from predictor.checkpoint import PredictorError, load_predictor, save_predictor
from predictor.data import PredictorDataError, load_arrays
from predictor.model import ExpertPredictor, PredictorConfig

__all__ = [
    "ExpertPredictor",
    "PredictorConfig",
    "PredictorDataError",
    "PredictorError",
    "load_arrays",
    "load_predictor",
    "save_predictor",
]
