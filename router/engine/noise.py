"""Counter-based random draws: the Gumbel noise of token `t` at output position `i` of a request seeded `s` is a pure
function of (s, i, t), computed for a whole batch in a few integer tensor ops on the batch's device. No generator
object, no state: a row's draw does not depend on what else is in the batch, on the device's random state, or on the
router that computes it (so a seeded stream continues exactly after a failover).

A row's key is `splitmix64(seed ^ splitmix64(position))` (on the host, one Python int per row); a token's 23-bit
uniform is two rounds of the lowbias32 integer hash over (key, token id), kept in 32 bits inside int64 tensors
(products wrap modulo 2**64, whose low 32 bits are the ones kept). Gumbel-max (argmax of logprob + noise) then draws
from the softmax of the logprobs exactly.

Legend: R rows, K candidate tokens per row.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 2**64 - 1
_TOKEN_MULT = 0x9E3779B1  # golden-ratio multiplier: spreads neighbouring token ids


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & (_MASK64 >> 1)  # non-negative int64


def row_key(seed: int, position: int) -> int:
    """The key of the draw at output `position` of a request seeded `seed` (63 bits)."""
    return splitmix64(seed ^ splitmix64(position))


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def uniforms(keys_R: torch.Tensor, ids_RK: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [R, K], of token ids_RK under row keys keys_R (int64)."""
    h = (ids_RK * _TOKEN_MULT + (keys_R & _MASK32)[:, None]) & _MASK32
    h = _lowbias32(h) ^ (keys_R >> 32)[:, None]
    return unit(_lowbias32(h))


def unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1): 23 bits, centred, so that 1 - 2**-24 at most (24
    bits would round the largest to 1.0, whose Gumbel noise is +inf: a masked token's -inf + inf is NaN, which argmax
    picks)."""
    return ((h >> 9).to(torch.float32) + 0.5) * 2.0**-23


def gumbel(keys_R: torch.Tensor, ids_RK: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise, float32 [R, K]: argmax(logprob + noise) is a draw from softmax(logprob)."""
    return -torch.log(-torch.log(uniforms(keys_R, ids_RK)))
