"""A blocking Python client for `moecluster.v1.Inference` (the asyncio twin is protos/async_client.py).

    with InferenceClient("localhost:50051") as client:
        client.wait_until_serving(timeout=60)
        gen = client.generate("Once upon a time", max_tokens=32, temperature=0)
        for chunk in gen:                  # as the tokens arrive
            print(chunk.text, end="", flush=True)
        print(gen.result.finish_reason)    # length | stop | abort
        client.generate_text("12 13 14", max_tokens=8).text
        client.generate_text(messages=[{"role": "user", "content": [
            {"type": "image", "path": "cat.png"}, {"type": "text", "text": "What is this?"}]}]).text

Every non-OK status is raised as `GenerationError` (its `code` a grpc.StatusCode, `field` the request field
at fault when the server named one).

A gateway with TLS, mutual TLS or API keys (README "Security"):

    InferenceClient("gw.example:50051", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client-key.pem",
                    api_key=os.environ["MOECLUSTER_API_KEY"])
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2

from protos.client_base import DEFAULT_MAX_MESSAGE_BYTES, ClientBase, GenerationCall
from protos.client_types import READINESS, Chunk, GenerationError, GenerationResult, tokenize_request
from protos.moecluster.v1 import inference_pb2 as pb

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Generation", "InferenceClient"]


class Generation(GenerationCall):
    """One Generate call: iterate for chunks; `result` once the stream has ended; `cancel()` to stop early
    (the server aborts the request and frees its KV blocks)."""

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for response in self._call:
                chunk = self._folder.add(response)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise self._folder.failure(e) from None


class InferenceClient(ClientBase[Generation]):
    """InferenceClient(target, max_message_bytes=32 MiB, channel=None, *, tls, tls_ca, tls_cert, tls_key, api_key):
    see ClientBase (protos/client_base.py)."""

    grpc_module = grpc
    generation_class = Generation

    def generate_text(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """The whole result at once (sent as one chunk: stream=False)."""
        gen = self.generate(prompt, stream=False, **kwargs)
        for _ in gen:
            pass
        return gen.result

    def tokenize(self, prompt: str | None = None, *, timeout: float | None = 30, **inputs) -> list[int]:
        """`inputs`: messages, images, add_special_tokens (see client_types.tokenize_request)."""
        return list(self._unary(self.stub.Tokenize, tokenize_request(prompt, **inputs), timeout).token_ids)

    def model_info(self, timeout: float | None = 30) -> pb.GetModelInfoResponse:
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def cluster_status(self, timeout: float | None = 30) -> pb.GetClusterStatusResponse:
        return self._unary(self.stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)

    def rebalance(self, timeout: float | None = 600) -> pb.RebalanceResponse:
        """Admin: recompute the expert map from the routed load and apply it (waits while copies load)."""
        return self._unary(self.stub.Rebalance, pb.RebalanceRequest(), timeout)

    def abort(self, *request_ids: str, timeout: float | None = 30) -> list[str]:
        """The ids that were in flight (their streams end with finish_reason "abort")."""
        return list(self._unary(self.stub.Abort, pb.AbortRequest(request_ids=request_ids), timeout).aborted)

    def health_status(self, service: str = READINESS, timeout: float | None = 5) -> str:
        """SERVING, NOT_SERVING, ... for a grpc.health.v1 name ("" = liveness); UNREACHABLE if no answer."""
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            status = self.health.Check(request, timeout=timeout, metadata=self.metadata).status
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.2) -> None:
        """Block until readiness is SERVING; TimeoutError naming the last status otherwise."""
        deadline, status = time.monotonic() + timeout, "UNREACHABLE"
        while time.monotonic() < deadline:
            status = self.health_status(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if status == "SERVING":
                return
            time.sleep(poll_s)
        raise TimeoutError(f"the server was not SERVING within {timeout}s (last status: {status})")

    def _unary(self, method, request, timeout):
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise GenerationError.from_rpc(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
