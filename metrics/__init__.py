"""Metric series as data, recorded through a sink (Prometheus or Ray)."""
