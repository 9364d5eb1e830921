"""What llamad tells operators: Prometheus metrics, the request log, journal streams."""
