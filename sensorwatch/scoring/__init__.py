"""Streaming scoring: features, calibration and the batched StreamScorer."""
