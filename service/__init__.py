"""sensorwatch service: MQTT ingestion, REST scoring, model reload, Prometheus metrics.

The deployable app around the :mod:`sensorwatch` library; the only package that does I/O.
(Built in the service issue; the library never imports it.)
"""
