"""Library messages that are expected on a machine like this one, kept off the user's screen.

A newcomer reads "Failed to load ..." or "we were unable to detect it" as a fault in their set-up. Two such lines are
expected and say nothing a user can act on:
- bitsandbytes, on a CPU with AVX512-bf16, tries an optional kernel from the `kernels` package at every import;
  finetune does not install that package, and bitsandbytes falls back to its own CPU code.
- DeepSpeed, at import on a machine without a GPU, says it is "Setting accelerator to CPU" — on stdout, where it
  would also break `--json` output.
Each is dropped by a filter on the one logger that emits it, matching its text, so everything else these libraries
say still shows: bitsandbytes' line when `kernels` is installed and fails to load, DeepSpeed's where finetune
itself sees a GPU (then DeepSpeed missed one, which is worth reading).
"""

from __future__ import annotations

import logging
from collections.abc import Callable


def _no_gpu() -> bool:
    from finetune.estimate import gpu

    return not gpu.detect()


class _Expected(logging.Filter):
    """Drops records of one logger whose text holds `fragment`, where `expected()` says the line is no news here."""

    def __init__(self, fragment: str, expected: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.fragment, self.expected = fragment, expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.fragment in record.getMessage() and self.expected())


EXPECTED: dict[str, tuple[_Expected, ...]] = {
    "bitsandbytes.backends.cpu.ops": (
        _Expected("from kernels-community: No module named 'kernels'"),),
    "DeepSpeed": (_Expected("Setting accelerator to CPU. If you have GPU or other accelerator", _no_gpu),),
}
"""Logger name → the filters for its expected lines (a logger's filters see only the records it emits itself)."""


def install() -> None:
    """Attach the filters before the libraries are imported (their lines are logged at import); idempotent."""
    for name, filters in EXPECTED.items():
        logger = logging.getLogger(name)
        for expected in filters:
            if expected not in logger.filters:
                logger.addFilter(expected)
