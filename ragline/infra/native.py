"""Load order of native libraries that cannot share a process in just any order.

Measured here (onnxruntime 1.28-1.32 and usearch 2.26 wheels, Debian 12's libstdc++): importing
``usearch`` first and ``onnxruntime`` after it crashes the process with SIGSEGV inside
``std::codecvt`` while onnxruntime's extension initialises; the other order works.  Every module that
imports usearch imports this one first, so onnxruntime (when installed) is always loaded before it.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    import onnxruntime  # noqa: F401  (imported for its side effect: loaded before usearch)

__all__: list[str] = []
