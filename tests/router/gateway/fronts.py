"""Helpers for the tests of the three fronts: a real server (Ray, routers, workers, the gateway with its gRPC and
HTTP ports) and each front's own client library: moecluster's, tritonclient (KServe v2) and the openai SDK."""

from __future__ import annotations

import queue
import time
import urllib.request

import numpy as np
import openai
import tritonclient.grpc as triton

from deploy.bench.interruption import StreamLog
from deploy.config import parse_serve_config
from deploy.server import Server
from protos.client import InferenceClient

GREEDY = dict(temperature=0.0, ignore_eos=True)


def serve(model_dir, routers: int = 1, workers: int = 2, **gateway) -> Server:
    """A started server (Prometheus metrics on a free port), serving."""
    config = parse_serve_config(
        {
            "model": {"path": str(model_dir)},
            "cluster": {"routers": routers, "workers": workers, "vision_encoders": 0},
            "scheduler": {"max_num_seqs": 16},
            "gateway": {"port": 0, "http_port": 0, "poll_interval_s": 0.1, **gateway},
            "metrics": {"enabled": True, "port": 0, "host": "127.0.0.1"},
        }
    )
    server = Server(config, show_progress=False).start()
    with InferenceClient(server.target) as client:
        client.wait_until_serving(timeout=60)
    return server


def openai_client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.gateway.http_port}/v1", api_key="unused", max_retries=0, **kw
    )


def engine_idle(server, timeout_s: float = 20.0) -> list:
    """Every router's (running, kv_blocks_used) once all are 0, or fails with the last seen."""
    deadline = time.monotonic() + timeout_s
    with InferenceClient(server.target) as client:
        while True:
            seen = [(r.running, r.waiting, r.kv_blocks_used) for r in client.cluster_status().routers]
            if not any(any(s) for s in seen):
                return seen
            assert time.monotonic() < deadline, f"the engines still hold requests: {seen}"
            time.sleep(0.1)


def scrape(server) -> dict[str, float]:
    """The metrics endpoint's samples, by name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.gateway.metrics_port}/metrics", timeout=10).read()
    lines = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


def running(server) -> int:
    with InferenceClient(server.target) as client:
        return sum(r.running for r in client.cluster_status().routers)


def wait_running(server, n: int = 1, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while running(server) < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests started"
        time.sleep(0.02)


# ---- KServe v2 with tritonclient ------------------------------------------------------------------------------
def text_input(prompt: str) -> triton.InferInput:
    t = triton.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return t


def ids_input(ids: list[int], datatype: str = "INT64") -> triton.InferInput:
    t = triton.InferInput("input_ids", [len(ids)], datatype)
    t.set_data_from_numpy(np.array(ids, dtype=np.int64 if datatype == "INT64" else np.int32))
    return t


def tensor(name: str, datatype: str, data) -> triton.InferInput:
    t = triton.InferInput(name, list(data.shape), datatype)
    t.set_data_from_numpy(data)
    return t


def images_input(images: list[bytes]) -> triton.InferInput:
    t = triton.InferInput("image", [len(images)], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=object))
    return t


def kserve_infer(client: triton.InferenceServerClient, inputs, **params) -> tuple[list[int], str, dict]:
    """Unary ModelInfer: (token ids, text, response parameters)."""
    result = client.infer("", inputs, parameters=params)
    return _ids(result), _text(result), _params(result)


class KServeStream:
    """One tritonclient ModelStreamInfer stream; `send` queues a request, `collect(rid)` reads its responses until
    the one with triton_final_response (or an error). `logs`: request id -> the StreamLog its tokens' arrivals go
    to, as they arrive."""

    def __init__(self, client: triton.InferenceServerClient, logs: dict[str, StreamLog] | None = None):
        self.client, self.logs = client, logs or {}
        self.responses: dict[str, queue.Queue] = {}
        self.errors: queue.Queue = queue.Queue()
        client.start_stream(callback=self._on_response)

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.errors.put(error)
            return
        rid = result.get_response().id
        if (log := self.logs.get(rid)) is not None:
            log.add(len(_ids(result)))
            log.done = bool(_params(result).get("triton_final_response"))
        self.responses.setdefault(rid, queue.Queue()).put(result)

    def send(self, rid: str, inputs, **params) -> None:
        self.responses.setdefault(rid, queue.Queue())
        self.client.async_stream_infer("", inputs, request_id=rid, parameters=params)

    def collect(self, rid: str, timeout_s: float = 120) -> tuple[list[int], str, dict, int]:
        """(token ids, text, the final response's parameters, how many responses)."""
        ids, text, n, q = [], [], 0, self.responses[rid]
        while True:
            result = q.get(timeout=timeout_s)
            n += 1
            ids += _ids(result)
            text.append(_text(result))
            params = _params(result)
            if params.get("triton_final_response"):
                return ids, "".join(text), params, n

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)


def _ids(result) -> list[int]:
    ids = result.as_numpy("output_ids")
    return [] if ids is None else [int(i) for i in ids]


def _text(result) -> str:
    text = result.as_numpy("text_output")
    return "" if text is None else b"".join(text).decode()


def _params(result) -> dict:
    out = {}
    for name, p in result.get_response().parameters.items():
        out[name] = getattr(p, p.WhichOneof("parameter_choice"))
    return out
