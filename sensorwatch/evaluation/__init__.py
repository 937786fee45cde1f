"""Offline evaluation of anomaly detectors (NAB scoring)."""

from sensorwatch.evaluation.nab import (
    NO_DETECTION_THRESHOLD,
    PROFILES,
    NabFile,
    NabResult,
    event_metrics,
    load_corpus,
    load_reference_scores,
    probation_length,
    scaled_sigmoid,
    score_all_profiles,
    score_at_threshold,
    score_corpus,
)

__all__ = [
    "NO_DETECTION_THRESHOLD",
    "PROFILES",
    "NabFile",
    "NabResult",
    "event_metrics",
    "load_corpus",
    "load_reference_scores",
    "probation_length",
    "scaled_sigmoid",
    "score_all_profiles",
    "score_at_threshold",
    "score_corpus",
]
