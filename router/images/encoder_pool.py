"""A router's vision encoders (actors): each image goes to the least busy live one, and an encoder's failure
never fails the request.

- **dies** (its call fails: SIGKILL, OOM, node loss): marked down, the encode is retried on another live encoder.
- **hangs** (no answer for `hang_timeout_s`): pinged; an encoder whose event loop still answers is busy (a large
  image on a CPU) and is waited for; one that does not answer (SIGSTOP, a wedged driver) is killed, turning the
  hang into a death, and the encode is retried.
- **none live**: the encode waits, up to `wait_s`, for the supervisor's replacement (deploy/supervisor.py replaces a
  dead encoder like any other actor and hands it to every router through `use`).
An image that fails on `max_attempts` encoders in turn (an image that kills every encoder it meets) ends with
EncoderUnavailable, as does waiting past `wait_s` or a pool given up by the supervisor.

The links are Ray actors in production (RayEncoderLink); tests give the pool fakes with the same three methods.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import ray

from cluster.errors import error_summary
from router.images.errors import EncoderLost, EncoderUnavailable

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class EncoderLink(Protocol):
    index: int

    async def encode(self, data: bytes): ...  # features or a Refusal; EncoderLost when the encoder is gone

    async def ping(self, timeout_s: float) -> bool: ...

    def kill(self) -> None: ...


@dataclass
class _Slot:
    link: EncoderLink
    live: bool = True
    busy: int = 0


class EncoderPool:
    def __init__(self, hang_timeout_s: float, wait_s: float, max_attempts: int = MAX_ATTEMPTS):
        self.hang_timeout_s, self.wait_s, self.max_attempts = hang_timeout_s, wait_s, max_attempts
        self.slots: dict[int, _Slot] = {}
        self.retries = 0
        self.failure: str | None = None  # set by `give_up`
        self._changed = asyncio.Event()

    def use(self, link: EncoderLink) -> None:
        """A started (or replacement) encoder takes its index's place."""
        self.slots[link.index] = _Slot(link)
        self._changed.set()

    def give_up(self, reason: str) -> None:
        """No encoder will come back: waiting encodes and new ones fail at once."""
        self.failure = reason
        self._changed.set()

    @property
    def live(self) -> list[int]:
        return sorted(i for i, s in self.slots.items() if s.live)

    async def encode(self, data: bytes):
        deadline = asyncio.get_running_loop().time() + self.wait_s
        failures: list[str] = []
        while True:
            slot = await self._next_live(deadline, failures)
            slot.busy += 1
            try:
                return await self._call(slot, data)
            except EncoderLost as e:
                failures.append(str(e))
            finally:
                slot.busy -= 1
            slot.live = False
            self.retries += 1
            log.warning("%s; retrying the image elsewhere", failures[-1])
            if len(failures) >= self.max_attempts:
                raise EncoderUnavailable(f"{len(failures)} vision encoders failed this image in turn: {failures}")

    async def _call(self, slot: _Slot, data: bytes):
        """The encoder's answer, waiting while it is busy but alive; EncoderLost when it died or hung (killed)."""
        call = asyncio.ensure_future(slot.link.encode(data))
        while True:
            done, _ = await asyncio.wait([call], timeout=self.hang_timeout_s)
            if done:
                return call.result()
            if not await slot.link.ping(self.hang_timeout_s):
                call.cancel()
                slot.link.kill()
                raise EncoderLost(
                    f"vision encoder {slot.link.index} hung (no answer to a ping within {self.hang_timeout_s:g}s); "
                    "killed it"
                )

    async def _next_live(self, deadline: float, failures: list[str]) -> _Slot:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            if self.failure is not None:
                raise EncoderUnavailable(f"the vision encoders were given up: {self.failure}")
            live = [s for s in self.slots.values() if s.live]
            if live:
                return min(live, key=lambda s: (s.busy, s.link.index))
            left = deadline - loop.time()
            if left <= 0:
                seen = f" (before: {failures})" if failures else ""
                raise EncoderUnavailable(f"no vision encoder was live within {self.wait_s:g}s{seen}")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass


class RayEncoderLink:
    def __init__(self, index: int, handle):
        self.index, self.handle = index, handle

    async def encode(self, data: bytes):
        try:
            return await self.handle.encode.remote(data)
        except ray.exceptions.RayActorError as e:
            raise EncoderLost(f"vision encoder {self.index} died: {error_summary(e)}") from None
        except ray.exceptions.RayError as e:  # its encode raised: a bug; kill it so that it is replaced
            self.kill()
            raise EncoderLost(f"vision encoder {self.index} failed ({error_summary(e)}); killed it") from None

    async def ping(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.handle.ping.remote().future()), timeout_s)
            return True
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            return False

    def kill(self) -> None:
        try:
            ray.kill(self.handle, no_restart=True)
        except (ray.exceptions.RayError, ValueError):
            pass
