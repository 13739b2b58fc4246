"""Counting the reads of a tensor's value on the host (`tolist`, `item`, `bool`, `int`, ...): each is a
device-to-host sync on a GPU. The sampler benchmark prints them; the exchange and sampler tests assert them."""

from __future__ import annotations

import torch


class HostSyncs:
    """A context in which every host read of a tensor is counted in `calls`."""

    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counted(method))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def _counted(self, method):
        def counted(tensor, *args):
            self.calls += 1
            return method(tensor, *args)

        return counted
