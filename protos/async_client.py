"""The asyncio client for `moecluster.v1.Inference`; the same calls as protos/client.py, awaited.

async with AsyncInferenceClient("localhost:50051") as client:
    await client.wait_until_serving(timeout=60)
    gen = client.generate("Once upon a time", max_tokens=32)
    async for chunk in gen:
        print(chunk.text, end="", flush=True)
    print(gen.result.finish_reason)

TLS, mutual TLS and API keys: the same keyword arguments as InferenceClient (tls, tls_ca, tls_cert, tls_key, api_key).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from protos.client_base import ClientBase, GenerationCall
from protos.client_types import READINESS, Chunk, GenerationError, GenerationResult, tokenize_request
from protos.moecluster.v1 import inference_pb2 as pb


class AsyncGeneration(GenerationCall):
    """One Generate call: `async for` the chunks; `result` once the stream has ended; `cancel()` to stop."""

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for response in self._call:
                chunk = self._folder.add(response)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise self._folder.failure(e) from None


class AsyncInferenceClient(ClientBase[AsyncGeneration]):
    """Create it inside the event loop that will use it (grpc.aio channels belong to one loop)."""

    grpc_module = grpc.aio
    generation_class = AsyncGeneration

    async def generate_text(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        gen = self.generate(prompt, stream=False, **kwargs)
        async for _ in gen:
            pass
        return gen.result

    async def tokenize(self, prompt: str | None = None, *, timeout: float | None = 30, **inputs) -> list[int]:
        """`inputs`: messages, images, add_special_tokens (see client_types.tokenize_request)."""
        return list((await self._unary(self.stub.Tokenize, tokenize_request(prompt, **inputs), timeout)).token_ids)

    async def model_info(self, timeout: float | None = 30) -> pb.GetModelInfoResponse:
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    async def cluster_status(self, timeout: float | None = 30) -> pb.GetClusterStatusResponse:
        return await self._unary(self.stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)

    async def rebalance(self, timeout: float | None = 600) -> pb.RebalanceResponse:
        return await self._unary(self.stub.Rebalance, pb.RebalanceRequest(), timeout)

    async def abort(self, *request_ids: str, timeout: float | None = 30) -> list[str]:
        return list((await self._unary(self.stub.Abort, pb.AbortRequest(request_ids=request_ids), timeout)).aborted)

    async def health_status(self, service: str = READINESS, timeout: float | None = 5) -> str:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            response = await self.health.Check(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.2) -> None:
        deadline, status = time.monotonic() + timeout, "UNREACHABLE"
        while time.monotonic() < deadline:
            status = await self.health_status(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if status == "SERVING":
                return
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"the server was not SERVING within {timeout}s (last status: {status})")

    async def _unary(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise GenerationError.from_rpc(e) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
