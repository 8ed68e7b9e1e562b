"""Reads from the client's FHIR server: prefetch first, then bounded reads behind a deadline and a circuit breaker."""
