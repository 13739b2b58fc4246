"""The gRPC gateway. Runs in the serve process (never inside a Ray actor) and reaches the cluster through Ray
handles: the server, the Inference service, health and readiness, wire conversion, Prometheus metrics."""
