"""moecluster.v1: inference.proto and its generated modules (regenerate with protos/generate.sh)."""
