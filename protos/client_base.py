"""What the blocking and the asyncio client (protos/client.py, protos/async_client.py) share: opening the channel
(message limits, TLS), the stubs and call metadata, starting a Generate call, and a Generation's result, request id
and cancel. Each client adds only how it waits: iterating or `async for`, calling or awaiting."""

from __future__ import annotations

from types import ModuleType
from typing import Generic, TypeVar

from grpc_health.v1 import health_pb2_grpc

from protos.client_types import GenerationResult, StreamFolder, build_request
from protos.credentials import Pem, call_metadata, channel_credentials
from protos.moecluster.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 32 * 2**20  # the server's default too (images make requests large)


def open_channel(
    grpc_module: ModuleType,
    target: str,
    max_message_bytes: int,
    tls: bool,
    tls_ca: Pem | None,
    tls_cert: Pem | None,
    tls_key: Pem | None,
):
    """A channel to `target` from `grpc_module` (`grpc` or `grpc.aio`): TLS when `tls` or any tls_* is given,
    messages up to `max_message_bytes` each way."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
    if credentials:
        return grpc_module.secure_channel(target, credentials, options)
    return grpc_module.insecure_channel(target, options)


class GenerationCall:
    """One Generate call: `result` once the stream has ended; `cancel()` to stop early (the server aborts the
    request and frees its KV blocks). The clients' Generation classes add the iteration."""

    def __init__(self, call, request_id: str = ""):
        self._call, self._request_id = call, request_id
        self._folder = StreamFolder()

    @property
    def request_id(self) -> str:
        """As given, or as the server assigned it (known from the first response on)."""
        return self._folder.result.request_id or self._request_id

    @property
    def result(self) -> GenerationResult:
        if not self._folder.done:
            raise RuntimeError("the stream has not completed; iterate it to the end first")
        return self._folder.result

    def cancel(self) -> None:
        self._call.cancel()


G = TypeVar("G", bound=GenerationCall)


class ClientBase(Generic[G]):
    """The stubs over one channel, the call metadata, and `generate`."""

    grpc_module: ModuleType  # grpc or grpc.aio: where the channel comes from
    generation_class: type[G]  # what `generate` returns

    def __init__(
        self,
        target: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel=None,
        *,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        api_key: str | None = None,
    ):
        """TLS when `tls` or any tls_* is given (tls_ca: the CA that signed the server's certificate, default the
        system's roots; tls_cert + tls_key: this client's certificate, for mutual TLS); each is a path or PEM
        bytes. `api_key` goes with every call as `authorization: Bearer <key>`. `channel`: one opened already
        (then target and the rest of the channel's settings are not used)."""
        if channel is None:
            channel = open_channel(self.grpc_module, target, max_message_bytes, tls, tls_ca, tls_cert, tls_key)
        self.metadata = call_metadata(api_key)
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **request) -> G:
        """Start a Generate call: `request` takes client_types.build_request's keywords (input_ids, messages, images,
        request_id, model, stream, cache_salt, and the sampling parameters); returns the client's
        Generation, to iterate."""
        call = self.stub.Generate(build_request(prompt, **request), timeout=timeout, metadata=self.metadata)
        return self.generation_class(call, request.get("request_id", ""))
