"""Forecasting models (recurrent, Gaussian head)."""

from sensorwatch.model.forecaster import CELLS, Forecaster, ForecasterConfig

__all__ = ["CELLS", "Forecaster", "ForecasterConfig"]
