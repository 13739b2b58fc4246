"""moecluster's gRPC API, one folder per version."""
