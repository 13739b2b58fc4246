"""The Open Inference Protocol (KServe v2), package `inference`: grpc_predict_v2.proto and its generated modules."""
