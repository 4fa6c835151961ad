"""Torch tensors on a real CUDA device (run on the accelerator machine: ``-m gpu``).

Skipped where ``torch.cuda.is_available()`` is False; the CPU-only suite covers the
same paths with records crafted to say "saved on cuda:0" (``test_torch_tensors.py``).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import reseal
from test_torch_tensors import (
    ALL_DTYPES,
    VIEWED_DTYPES,
    Holder,
    moved_warnings,
    random_tensor,
    save_and_restore,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def to_cuda(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on cuda:0, its bytes moved as integers (no copy kernel for bits16...)."""
    if tensor.dtype in VIEWED_DTYPES:
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32}[tensor.dtype.itemsize]
        return tensor.view(width).to("cuda:0").view(tensor.dtype)
    return tensor.to("cuda:0")


def cuda_state() -> dict[str, Any]:
    state: dict[str, Any] = {str(d): to_cuda(random_tensor(d)) for d in ALL_DTYPES}
    state["strided_bf16"] = to_cuda(random_tensor(torch.bfloat16, (4, 6)))[:, ::2]
    state["conj"] = torch.randn(3, dtype=torch.complex64, device="cuda:0").conj()
    state["grad_bf16"] = torch.randn(4, device="cuda:0").bfloat16().requires_grad_(True)
    state["param"] = torch.nn.Parameter(torch.randn(3, 3, device="cuda:0"))
    state["view"] = torch.arange(12.0, device="cuda:0").reshape(3, 4).t()
    state["cpu"] = torch.randn(3)
    return state


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes on the CPU, as integers (moved as integers: see to_cuda)."""
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.dtype in VIEWED_DTYPES:
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32}[t.dtype.itemsize]
        t = t.view(width)
    return t.contiguous().cpu().reshape(-1).view(torch.uint8)


def assert_same(actual: Any, expected: torch.Tensor, device: str) -> None:
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.requires_grad == expected.requires_grad
    assert str(actual.device) == device
    assert torch.equal(bits(actual), bits(expected))


def test_cuda_tensors_round_trip_back_to_their_device(tmp_path: Path) -> None:
    """Default placement: each tensor back on the device it was saved from, bit-exact,
    no warning; the file holds ckptable's records (no torch.save inside)."""
    state = cuda_state()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = save_and_restore(tmp_path, state)
    assert moved_warnings(record) == []
    for key, tensor in state.items():
        assert_same(restored[key], tensor, str(tensor.device))
    raw = Path(tmp_path, "ckpt", "state.pkl").read_bytes()
    assert b"_load_from_bytes" not in raw
    assert b"cuda:0" in raw


def test_cuda_tensors_map_to_cpu(tmp_path: Path) -> None:
    state = cuda_state()
    for i, map_location in enumerate(("cpu", torch.device("cpu"), {"cuda:0": "cpu"})):
        restored = save_and_restore(tmp_path / str(i), state, map_location=map_location)
        for key, tensor in state.items():
            assert_same(restored[key], tensor, "cpu")
    moved: list[str] = []

    def to_cpu(tensor: torch.Tensor, saved: str) -> torch.Tensor:
        moved.append(saved)
        return tensor.to("cpu")

    restored = save_and_restore(tmp_path / "callable", state, map_location=to_cpu)
    assert set(moved) == {"cuda:0", "cpu"}
    assert_same(restored["param"], state["param"], "cpu")


def test_cpu_tensors_map_to_cuda_and_safe_mode(tmp_path: Path) -> None:
    state = {"w": torch.randn(5), "bf16": torch.randn(3).bfloat16()}
    restored = save_and_restore(tmp_path / "a", state, map_location="cuda:0", safe=True)
    for key, tensor in state.items():
        assert_same(restored[key], tensor, "cuda:0")


def test_old_torch_reducer_cuda_tensors(tmp_path: Path) -> None:
    """Tensors pickled by torch itself on the GPU (older checkpoints, RLlib's): back on
    the GPU by default, on the CPU with map_location, also in safe mode."""
    import cloudpickle

    tensors = {
        "w": torch.randn(3, 4, device="cuda:0"),
        "p": torch.nn.Parameter(torch.randn(2).cuda()),
    }
    obj = Holder()
    obj.state = {"placeholder": 0}
    path = obj.save_to_path(tmp_path / "old")
    Path(path, "state.pkl").write_bytes(
        cloudpickle.dumps(tensors, protocol=pickle.HIGHEST_PROTOCOL)
    )
    reseal(path)
    for kwargs, device in (({}, "cuda:0"), ({"map_location": "cpu"}, "cpu"),
                           ({"safe": True}, "cuda:0")):  # fmt: skip
        new = Holder()
        new.restore_from_path(path, **kwargs)
        for key, tensor in tensors.items():
            assert_same(new.state[key], tensor, device)


def test_gpu_save_and_restore_throughput(tmp_path: Path) -> None:
    """512 MiB of CUDA float32 through save and restore (prints the times)."""
    import time

    state = {f"w{i}": torch.randn(1 << 24, device="cuda:0") for i in range(8)}
    torch.cuda.synchronize()
    obj = Holder()
    obj.state = state
    start = time.perf_counter()
    path = obj.save_to_path(tmp_path / "big", durable=False)
    saved = time.perf_counter() - start
    new = Holder()
    start = time.perf_counter()
    new.restore_from_path(path)
    torch.cuda.synchronize()
    restored = time.perf_counter() - start
    print(f"512 MiB CUDA float32: save {saved:.2f} s, restore {restored:.2f} s")
    assert all(torch.equal(new.state[k], v) for k, v in state.items())
