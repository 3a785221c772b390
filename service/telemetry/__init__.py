"""Telemetry: Prometheus metrics, OpenTelemetry traces, request IDs and logs."""
