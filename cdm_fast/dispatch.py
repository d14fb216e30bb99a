"""Backend registry and selection: (op, backend) -> implementation, capability gate, tolerances.

Dispatch, `cdm-fast doctor`, the tests and the ahead-of-time compile check all read `REGISTRY`;
nothing else keeps a list of backends. Auto order is cuda -> triton -> torch; `CDM_FAST_BACKEND`
overrides auto; an explicit request that cannot be served raises `BackendUnavailable` with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("cdm_fast")

BACKENDS = ("cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message says why."""


@dataclass(frozen=True)
class Implementation:
    """One backend of one op.

    `supports(*args, **kwargs)` returns None when this backend can serve the call and otherwise a short
    reason ("not built", "needs CUDA tensors", "fp8 needs compute capability >= 8.9", ...).
    `tolerances` maps a precision name to the bound on ||out - ref|| / ||ref|| that the tests enforce.
    """

    op: str
    backend: str
    forward: Callable[..., Any]
    supports: Callable[..., str | None]
    tolerances: dict[str, float] = field(default_factory=dict)
    backward: Callable[..., Any] | None = None


REGISTRY: dict[tuple[str, str], Implementation] = {}
# op -> factory of labelled sample calls on a device; doctor asks every backend's gate about these.
EXAMPLE_CALLS: dict[str, Callable[[Any], list[tuple[str, tuple]]]] = {}
_logged_fallbacks: set[tuple[str, str, str]] = set()


def register(impl: Implementation) -> Implementation:
    if impl.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {impl.backend!r}")
    key = (impl.op, impl.backend)
    if key in REGISTRY:
        raise ValueError(f"{impl.op}/{impl.backend} is registered twice")
    REGISTRY[key] = impl
    return impl


def register_examples(op: str, factory: Callable[[Any], list[tuple[str, tuple]]]) -> None:
    """`factory(device)` returns [(label, args)] of representative calls, e.g. [("bf16", (x, freqs, ...))]."""
    EXAMPLE_CALLS[op] = factory


def implementations(op: str) -> list[Implementation]:
    """The registered backends of `op`, in auto order."""
    return [REGISTRY[(op, b)] for b in BACKENDS if (op, b) in REGISTRY]


def requested_backend(backend: str | None) -> str:
    """Resolve `backend=None` to the environment override or "auto"; validate the name."""
    name = backend if backend is not None else os.environ.get("CDM_FAST_BACKEND", "auto")
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"backend: expected one of {('auto', *BACKENDS)} or None, got {name!r}")
    return name


def select(op: str, backend: str | None, *args: Any, **kwargs: Any) -> Implementation:
    """Pick the implementation of `op` for this call.

    Explicit backends raise `BackendUnavailable` naming the reason; auto takes the first backend that
    supports the call and logs once at INFO why the better ones were skipped.
    """
    name = requested_backend(backend)
    if name != "auto":
        impl = REGISTRY.get((op, name))
        if impl is None:
            raise BackendUnavailable(f"{op}: no {name!r} implementation exists")
        reason = impl.supports(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {name!r} unavailable: {reason}")
        return impl
    skipped = []
    for impl in implementations(op):
        reason = impl.supports(*args, **kwargs)
        if reason is None:
            if skipped:
                _log_fallback_once(op, impl.backend, skipped)
            return impl
        skipped.append((impl.backend, reason))
    details = "; ".join(f"{b}: {r}" for b, r in skipped)
    raise BackendUnavailable(f"{op}: no backend supports this call ({details})")


def _log_fallback_once(op: str, chosen: str, skipped: list[tuple[str, str]]) -> None:
    details = "; ".join(f"{b}: {r}" for b, r in skipped)
    key = (op, chosen, details)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.info("%s: using %s backend (%s)", op, chosen, details)
