"""KServe v2 gRPC: grpc_predict_v2.proto (vendored; see its header) and its generated modules (protos/generate.sh)."""
