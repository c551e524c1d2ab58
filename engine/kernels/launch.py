"""A planned kernel launch: built by the host wrappers, then run, inspected or compiled ahead.

Separating the plan from the launch lets tests look at the exact compile-time constants of every
launch (the interpreter does not enforce the GPU compiler's rules), and lets
`engine.kernels.aot` compile the very same launches for a GPU architecture without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KernelLaunch:
    kernel: Any  # a @triton.jit function (or the interpreter's stand-in)
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments: tensors and scalars
    constexprs: dict[str, Any]  # compile-time constants
    options: dict[str, int] = field(default_factory=dict)  # num_warps, num_stages

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)
