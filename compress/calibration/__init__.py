"""Calibration: observers stream activation statistics into a store, through one driver."""

from .driver import StatRequest, calibrate, observe, sequential_calibrate
from .observers import (
    OBSERVERS,
    HessianObserver,
    HistogramObserver,
    MeanObserver,
    MeanSquareObserver,
    MinMaxObserver,
    RowsObserver,
)
from .store import StatsStore, model_fingerprint

__all__ = [
    "OBSERVERS", "HessianObserver", "HistogramObserver", "MeanObserver", "MeanSquareObserver", "MinMaxObserver",
    "RowsObserver",
    "StatRequest", "StatsStore", "calibrate", "model_fingerprint", "observe", "sequential_calibrate",
]
