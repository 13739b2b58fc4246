"""What the gateway's end-to-end tests share besides fixtures (those are in conftest.py): the serve config they
start a Server from, streams read on threads of their own, and the refusal a call ends in."""

from __future__ import annotations

import threading

import pytest
import ray

from deploy.bench.interruption import StreamLog
from deploy.config import ServeConfig, parse_serve_config
from protos.client import InferenceClient
from protos.client_types import GenerationError


def serve_config(model_dir, **sections: dict) -> ServeConfig:
    """The serve config of `model_dir` with the gateway on a free port polling the engines every 0.1 s, plus
    `sections` (model, cluster, scheduler, gateway, metrics: a `gateway` section adds to those two keys)."""
    gateway = {"port": 0, "http_port": 0, "poll_interval_s": 0.1, **sections.pop("gateway", {})}
    return parse_serve_config({"model": {"path": str(model_dir)}, **sections, "gateway": gateway})


class StreamThread:
    """A `generate()` stream read on a thread of its own: `tokens` grows while it runs, `error` is what ended it
    early (None when it completed). `closing`: a client to close once the stream has ended."""

    def __init__(self, gen, closing: InferenceClient | None = None):
        self.gen, self.closing = gen, closing
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for chunk in self.gen:
                self.tokens += chunk.token_ids
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            if self.closing is not None:
                self.closing.close()

    def result(self, timeout_s: float = 120.0) -> list[int]:
        """The tokens of the completed stream (asserts that it ended within `timeout_s`, without an error)."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.tokens


def start_streams(
    target: str, requests: list[dict], results: dict, errors: list, logs: list[StreamLog]
) -> list[threading.Thread]:
    """Each of `requests` (generate keyword arguments) streamed on a client and a thread of its own, started:
    request i's token arrivals go to `logs[i]`, its token ids to `results[i]`, a GenerationError to `errors`."""

    def one(i):
        try:
            with InferenceClient(target) as client:
                gen = client.generate(**requests[i])
                for chunk in gen:
                    logs[i].add(len(chunk.token_ids))
                results[i] = gen.result.token_ids
        except GenerationError as e:
            errors.append(e)
        finally:
            logs[i].done = True

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    return threads


def model_info_error(target: str, timeout_s: float = 10.0, **client_args) -> GenerationError:
    """The GenerationError a GetModelInfo call on `target` ends in (it fails the test if the call succeeds)."""
    with InferenceClient(target, **client_args) as client, pytest.raises(GenerationError) as info:
        client.model_info(timeout=timeout_s)
    return info.value


def router_pid(server, index: int) -> int:
    """The process id of router `index` of `server`'s cluster."""
    return ray.get(server.cluster.routers[index].health.remote(), timeout=30).pid
