"""The client side of `moecluster bench grpc`, in a process of its own, as real clients are: driving the fronts from
the server's own process would have each client library's Python (protobuf, pydantic, httpx) take the GIL from the
gateway it measures, and charge the heavier libraries' cost to their front.

`FrontClients` starts `python -m deploy.bench.front_clients` and sends it one JSON line per measurement
({"front", "target", "http_port", "model", "prompts", "max_tokens"}); the process runs the streams together on its
one event loop (grpc.aio binds its poller to the first loop) and answers one JSON line: each stream's time to first
token, the gaps between its tokens, and the tokens per second of them all. Every wait on it is bounded; if it dies,
the error carries the end of what it wrote to stderr.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import subprocess
import sys
import tempfile
import time

FRONTS = ("moecluster", "kserve", "openai")


class BenchClientError(Exception):
    """The client process failed, hung or died."""


class FrontClients:
    """The client process, started on entering and stopped on leaving (`with FrontClients() as clients:`)."""

    def __init__(self, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()

    def __enter__(self) -> FrontClients:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.bench.front_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        return self

    def __exit__(self, *exc) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.stdin.close()  # end of input: it exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._stderr.close()

    def run(self, front: str, server, prompts: list[list[int]], max_tokens: int) -> tuple[list, list, float]:
        """(TTFTs, ITLs, tokens/s) of `prompts` streamed through `front` of `server` together."""
        command = {
            "front": front,
            "target": server.target,
            "http_port": server.gateway.http_port,
            "model": server.model_name,
            "prompts": prompts,
            "max_tokens": max_tokens,
        }
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchClientError(f"the bench's client process has exited: {self._stderr_tail()}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.proc.kill()
            raise BenchClientError(f"{front}: no answer from the bench's client process within {self.timeout_s:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise BenchClientError(f"the bench's client process exited ({self.proc.returncode}): {self._stderr_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchClientError(f"{front}: {answer['error']}")
        return answer["ttfts"], answer["itls"], answer["rate"]

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) or "(it wrote nothing to stderr)"


# ---- the client process ---------------------------------------------------------------------------------------


async def timed(streams) -> tuple[list[float], list[float], float]:
    """Run the async iterators of token counts together: TTFTs, ITLs, tokens/s."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(s) for s in streams))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    itls = [gap for r in results for gap in r[1]]
    return ttfts, itls, sum(r[2] for r in results) / wall


async def _one(stream) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    times, tokens = [], 0
    async for n in stream:
        times.append(time.perf_counter())
        tokens += n
    if not times:
        raise RuntimeError("a stream ended without a token")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - start, gaps, tokens


class _Clients:
    """One client per front, made on first use and kept (connections stay open between measurements)."""

    def __init__(self):
        self.made: dict[str, object] = {}

    async def run(self, c: dict) -> tuple[list[float], list[float], float]:
        front = c["front"]
        if front not in FRONTS:
            raise ValueError(f"front: must be one of {', '.join(FRONTS)}, got {front!r}")
        stream = getattr(self, f"_{front}")
        return await timed([stream(c, ids) for ids in c["prompts"]])

    def _client(self, front: str, make):
        if front not in self.made:
            self.made[front] = make()
        return self.made[front]

    async def _moecluster(self, c, ids):
        from protos.async_client import AsyncInferenceClient

        client = self._client("moecluster", lambda: AsyncInferenceClient(c["target"]))
        gen = client.generate(input_ids=ids, temperature=0.0, top_k=0, max_tokens=c["max_tokens"], ignore_eos=True)
        async for chunk in gen:
            if chunk.token_ids:
                yield len(chunk.token_ids)

    async def _kserve(self, c, ids):
        """ModelStreamInfer, one request per stream."""
        import numpy as np
        import tritonclient.grpc.aio as triton

        client = self._client("kserve", lambda: triton.InferenceServerClient(c["target"]))
        tensor = triton.InferInput("input_ids", [len(ids)], "INT64")
        tensor.set_data_from_numpy(np.array(ids, dtype=np.int64))
        parameters = {"max_tokens": c["max_tokens"], "temperature": 0.0, "top_k": 0, "ignore_eos": True}

        async def one_request():
            yield {"model_name": "", "inputs": [tensor], "parameters": parameters}

        async for result, error in client.stream_infer(one_request()):
            if error is not None:
                raise error
            out = result.as_numpy("output_ids")
            if out is not None and len(out):
                yield len(out)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break

    async def _openai(self, c, ids):
        """Streamed completions; each chunk is one engine Delta (one token while decoding). logprobs=0: a token whose
        text is held back (random weights write many incomplete characters) still makes a chunk, as it makes a
        message on the gRPC fronts; the usage at the end counts any that made none."""
        import openai

        base = f"http://127.0.0.1:{c['http_port']}/v1"
        client = self._client("openai", lambda: openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0))
        chunks = await client.completions.create(
            model=c["model"],
            prompt=ids,
            max_tokens=c["max_tokens"],
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=0,
            extra_body={"top_k": 0, "ignore_eos": True},
        )
        counted = 0
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason is None:
                counted += 1
                yield 1
            elif chunk.usage is not None and chunk.usage.completion_tokens > counted:
                yield chunk.usage.completion_tokens - counted


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    clients = _Clients()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            ttfts, itls, rate = await clients.run(json.loads(line))
            answer = {"ttfts": ttfts, "itls": itls, "rate": rate}
        except Exception as e:  # noqa: BLE001 - sent back to the bench, which names the front
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(_serve())
