"""The registry and backend selection: explicit requests, the env override, auto fallbacks, the reasons."""

from __future__ import annotations

import logging

import pytest
import torch

import cdm_fast
from cdm_fast import dispatch
from cdm_fast.dispatch import BACKENDS, REGISTRY, Implementation, implementations


def _args():
    return (torch.randn(3, 4), torch.randn(4, 2), torch.randn(4, 5), None, "bf16", "rowwise")


def test_every_registered_implementation_has_a_gate_forward_backward_and_tolerances():
    assert REGISTRY, "no op registered"
    for (op, backend), impl in REGISTRY.items():
        assert backend in BACKENDS
        assert callable(impl.forward) and callable(impl.supports) and callable(impl.backward), (op, backend)
        assert impl.tolerances, f"{op}/{backend} states no test tolerances"
        assert all(0 < bound < 0.1 for bound in impl.tolerances.values()), (op, backend)


def test_every_op_has_a_torch_reference_backend_and_example_calls():
    ops = {op for op, _ in REGISTRY}
    for op in ops:
        assert (op, "torch") in REGISTRY, f"{op} has no torch backend"
        assert op in dispatch.EXAMPLE_CALLS, f"{op} has no example calls for doctor"


def test_implementations_come_in_auto_order():
    order = [impl.backend for impl in implementations("projection")]
    assert order == sorted(order, key=BACKENDS.index)


def test_unknown_backend_name_raises_value_error_naming_backend():
    with pytest.raises(ValueError, match="backend"):
        dispatch.select("projection", "cuDNN", *_args())


def test_env_override_is_used_when_backend_is_none(monkeypatch):
    monkeypatch.setenv("CDM_FAST_BACKEND", "torch")
    assert dispatch.select("projection", None, *_args()).backend == "torch"
    monkeypatch.setenv("CDM_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CDM_FAST_BACKEND|backend"):
        dispatch.select("projection", None, *_args())


def test_explicit_unavailable_backend_raises_with_its_reason(monkeypatch):
    calls = []

    def never(*args):
        calls.append(args)
        return "not built for this test"

    key = ("__test_op", "cuda")
    monkeypatch.setitem(
        REGISTRY, key, Implementation("__test_op", "cuda", lambda *a: None, never, {"x": 1e-3})
    )
    with pytest.raises(cdm_fast.BackendUnavailable, match="not built for this test"):
        dispatch.select("__test_op", "cuda", 1, 2)
    assert calls == [(1, 2)]


def test_auto_falls_back_in_order_and_logs_the_reason_once(monkeypatch, caplog):
    def fast(*args):
        return "needs a GPU"

    def slow(*args):
        return None

    monkeypatch.setitem(
        REGISTRY, ("__test_op", "cuda"), Implementation("__test_op", "cuda", fast, fast, {"x": 1})
    )
    monkeypatch.setitem(
        REGISTRY, ("__test_op", "torch"), Implementation("__test_op", "torch", slow, slow, {"x": 1})
    )
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    with caplog.at_level(logging.INFO, logger="cdm_fast"):
        for _ in range(3):
            assert dispatch.select("__test_op", "auto").backend == "torch"
    messages = [r.getMessage() for r in caplog.records if "__test_op" in r.getMessage()]
    assert len(messages) == 1 and "needs a GPU" in messages[0]


def test_auto_with_no_capable_backend_lists_every_reason(monkeypatch):
    def no(*args):
        return "nope"

    monkeypatch.setitem(
        REGISTRY, ("__test_op", "torch"), Implementation("__test_op", "torch", no, no, {"x": 1})
    )
    with pytest.raises(cdm_fast.BackendUnavailable, match="torch: nope"):
        dispatch.select("__test_op", "auto")


def test_registering_a_backend_twice_is_refused():
    impl = REGISTRY[("projection", "torch")]
    with pytest.raises(ValueError, match="twice"):
        dispatch.register(impl)
