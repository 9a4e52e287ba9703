"""Triton where it imports, stand-ins where it does not: kernel modules take `triton`, `tl` and `jit` from here,
so `import lowmem` and every torch path work on machines without Triton (the dispatcher then never picks it).

`TRITON_INTERPRET=1` must be set before a kernel module is imported: `triton.jit` decides at decoration time
whether a kernel is compiled for the GPU or run by the CPU interpreter."""
from __future__ import annotations

from typing import Any, Callable

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    jit = triton.jit
except ImportError:
    triton = None
    HAVE_TRITON = False

    class _Language:
        # kernel signatures annotate with tl.constexpr, module constants call it; bodies never run without Triton
        @staticmethod
        def constexpr(value: Any = None) -> Any:
            return value

    tl = _Language()

    class _Unavailable:
        def __init__(self, fn: Callable):
            self.__name__ = fn.__name__

        def __getitem__(self, grid: Any) -> Callable:
            raise RuntimeError(f"cannot launch {self.__name__}: Triton is not installed")

    def jit(fn: Callable) -> _Unavailable:
        return _Unavailable(fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """tl.arange needs power-of-2 lengths."""
    return 1 << max(0, n - 1).bit_length()

