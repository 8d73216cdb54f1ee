"""What leaves the process: Prometheus metrics, log events (and, later, OTLP)."""
