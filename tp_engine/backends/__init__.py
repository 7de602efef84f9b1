"""Backends: the small array interface every rule, op, loss and optimizer is written against.

A backend supplies array math (numpy names where they exist), variables that can be assigned,
gradients of local losses, and a way to compile a step. ``numpy`` is always available;
``tensorflow`` is imported only when asked for.
"""
from __future__ import annotations

from tp_engine.backends.base import Backend


def get_backend(name: str, device: str = "auto", jit_compile: bool = True) -> Backend:
    if name == "numpy":
        from tp_engine.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "tensorflow":
        from tp_engine.backends.tf_backend import TensorflowBackend

        return TensorflowBackend(device=device, jit_compile=jit_compile)
    raise ValueError(f"unknown backend {name!r}; choose numpy or tensorflow")


__all__ = ["Backend", "get_backend"]
