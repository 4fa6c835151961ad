"""Async saves of torch tensors: copied before the call returns, written exactly.

CPU tensors go into the snapshot's arena as numpy buffers; GPU tensors into a reused
block of pinned host memory (``ckptable._snapshot_torch``). Without a GPU, the GPU path
runs on CPU tensors by adding ``"cpu"`` to ``HOST_COPY_DEVICE_TYPES`` (the ``host_copies``
fixture): the same placeholders, host block, records and fallbacks, with plain copies
instead of stream copies. The tests marked ``gpu`` run the real thing (``-m gpu``).
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptable
from ckptable import Checkpointable, CheckpointManager
from ckptable import _snapshot_torch as snapshot_torch
from ckptable._async import _default_pool
from ckptable._snapshot import SnapshotPool, take_snapshot
from ckptable._torch import load_pickle, pickler_class, reduce_tensor
from ckptable._torch_placement import TensorPlacement

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

#: Every dtype of this torch that ckptable writes as a record (bf16 and fp8 included).
DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16", "complex32",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16",
]  # fmt: skip
DTYPES = [getattr(torch, name) for name in DTYPE_NAMES if hasattr(torch, name)]


class Model(Checkpointable):
    """A level holding whatever state it is given; its background save can be held
    midway (``get_ctor_args_and_kwargs`` runs after the snapshot, in the save)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = dict(state or {})
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        return dict(self.state)  # live references: what an async save must guard against

    def set_state(self, state: dict) -> None:
        self.state = dict(state)

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        self.entered.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the save")
        return (), {}

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> Any:
    """A tensor of ``dtype`` from random bytes (NaN payloads, subnormals and all)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), generator=gen)
    raw = raw.to(torch.uint8)
    if dtype is torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes on the CPU: equal iff bit-for-bit equal (NaN payloads too)."""
    t = tensor.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).cpu()


def assert_same(actual: Any, expected: torch.Tensor, device: str | None = None) -> None:
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.requires_grad == expected.requires_grad
    assert str(actual.device) == (device or str(expected.device))
    assert torch.equal(bits(actual), bits(expected))


def cpu_state() -> dict[str, Any]:
    state: dict[str, Any] = {str(d): random_tensor(d, seed=i) for i, d in enumerate(DTYPES)}
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.empty(0, 3)
    state["strided"] = torch.arange(12.0).reshape(3, 4).t()
    state["conj"] = torch.randn(3, dtype=torch.complex64).conj()
    state["grad_bf16"] = torch.randn(4).bfloat16().requires_grad_(True)
    state["param"] = torch.nn.Parameter(torch.randn(3, 3))
    state["nested"] = {"w": torch.randn(2, 2), "array": np.arange(5.0), "step": 7}
    return state


#: dtypes the safetensors format has no name for.
NOT_IN_SAFETENSORS = ("complex128", "complex32", "bits8", "bits16", "float4_e2m1fn_x2")


def safetensors_fit(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the tensors of dtypes the safetensors format cannot hold."""
    return {k: v for k, v in state.items() if not k.endswith(NOT_IN_SAFETENSORS)}


def clone(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: clone(v) for k, v in state.items()}
    if isinstance(state, torch.nn.Parameter):
        return torch.nn.Parameter(state.detach().clone(), state.requires_grad)
    if isinstance(state, torch.Tensor):
        return state.detach().clone().requires_grad_(state.requires_grad)
    if isinstance(state, np.ndarray):
        return state.copy()
    return state


def assert_states_same(actual: Any, expected: Any, device: str | None = None) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key, value in expected.items():
            assert_states_same(actual[key], value, device)
    elif isinstance(expected, torch.Tensor):
        assert_same(actual, expected, device)
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected)
    else:
        assert actual == expected


def mutate(state: Any) -> None:
    """Change every tensor and array of ``state`` in place."""
    for value in state.values():
        if isinstance(value, dict):
            mutate(value)
        elif isinstance(value, torch.Tensor):
            data = value.detach()
            if data.is_contiguous() and not data.is_conj():
                data.reshape(-1).view(torch.uint8).bitwise_not_()
            else:
                data.zero_()
        elif isinstance(value, np.ndarray):
            value[...] = -1


@pytest.fixture
def host_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CPU tensors take the GPU tensors' path (host block, placeholders, records)."""
    monkeypatch.setattr(snapshot_torch, "HOST_COPY_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    ckptable.release_snapshot_memory()
    yield
    ckptable.release_snapshot_memory()


# ---------------------------------------------------------------------- CPU tensors


def test_cpu_tensors_of_every_dtype_round_trip_exactly(tmp_path: Path) -> None:
    state = cpu_state()
    path = ckptable.save_async(Model(state), tmp_path / "ckpt").result(timeout=60)
    restored = Model.from_checkpoint(path)
    assert_states_same(restored.state, state)
    assert b"_load_from_bytes" not in Path(path, "state.pkl").read_bytes()


def test_cpu_tensors_are_copied_into_the_arena_out_of_band() -> None:
    """The skeleton holds no tensor bytes: each tensor is one buffer in the arena."""
    weights = torch.randn(1 << 20)  # 4 MiB
    bf16 = torch.randn(1 << 20).bfloat16()
    pool = SnapshotPool()
    snapshot = take_snapshot({"w": weights, "bf16": bf16}, pool)
    assert len(snapshot._skeleton) < 4096
    assert [length for _, length in snapshot._spans] == [weights.nbytes, bf16.nbytes]
    assert not snapshot.has_device_tensors
    again = snapshot.materialize()
    weights.zero_()
    assert not torch.equal(again["w"], weights)  # a copy, not a view of the original
    assert again["bf16"].dtype is torch.bfloat16 and torch.equal(again["bf16"], bf16)
    del again
    snapshot.release(reuse=False)


def test_in_place_updates_after_the_call_never_reach_the_checkpoint(tmp_path: Path) -> None:
    state = cpu_state()
    expected = clone(state)
    model = Model(state)
    model.hold()
    future = ckptable.save_async(model, tmp_path / "ckpt")
    assert model.entered.wait(30)  # the background save is running...
    mutate(model.state)  # ...and the caller changes every tensor in place
    model.release.set()
    path = future.result(timeout=60)
    assert not torch.equal(model.state["torch.float32"], expected["torch.float32"])
    assert_states_same(Model.from_checkpoint(path).state, expected)


def test_the_arena_is_reused_across_saves(tmp_path: Path) -> None:
    ckptable.release_snapshot_memory()
    model = Model({"w": torch.randn(1 << 22), "m": torch.randn(1 << 20).bfloat16()})
    ckptable.save_async(model, tmp_path / "a").result(timeout=60)
    [arena] = _default_pool._idle
    address = np.frombuffer(arena.memory, dtype=np.uint8).ctypes.data
    model.state["w"].add_(1)
    path = ckptable.save_async(model, tmp_path / "b").result(timeout=60)
    assert _default_pool._idle == [arena]
    assert np.frombuffer(arena.memory, dtype=np.uint8).ctypes.data == address
    assert_states_same(Model.from_checkpoint(path).state, model.state)
    ckptable.release_snapshot_memory()
    assert _default_pool.idle_bytes == 0


def test_import_and_non_tensor_async_saves_never_import_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ckptable
        from trees import Model
        model = Model(layers=2, width=1 << 10)
        ckptable.save_async(model, {str(tmp_path / "ckpt")!r}).result(60)
        restored = Model.from_checkpoint({str(tmp_path / "ckpt")!r})
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ------------------------------------------- the GPU path, run on the CPU (host_copies)


@pytest.mark.usefixtures("host_copies")
def test_host_copies_write_exactly_the_file_of_a_synchronous_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host copies pickle as the records of the original tensors: the state file is
    byte for byte the synchronous save's, and restores exactly. (Tensors only: a numpy
    array back from a snapshot has a dtype object of its own, which pickle's memo then
    writes once more.)"""
    state = {k: v for k, v in cpu_state().items() if k != "nested"}
    state["nested"] = {"w": torch.randn(2, 2), "step": 7}
    written: list[str] = []
    reduce = snapshot_torch.HostTensor.__reduce__

    def spy(self: snapshot_torch.HostTensor) -> Any:
        written.append(self.device)
        return reduce(self)

    monkeypatch.setattr(snapshot_torch.HostTensor, "__reduce__", spy)
    model = Model(state)
    path = ckptable.save_async(model, tmp_path / "async").result(timeout=60)
    assert len(written) == len(state)  # every tensor (one in "nested"), from its host copy
    [host] = _default_pool.idle_host_arenas  # the tensors went through the host block
    assert not host.pinned  # (no GPU tensor: no page-locked memory)
    model.save_to_path(tmp_path / "sync")
    assert Path(path, "state.pkl").read_bytes() == Path(tmp_path, "sync", "state.pkl").read_bytes()
    assert_states_same(Model.from_checkpoint(path).state, state)


@pytest.mark.usefixtures("host_copies")
def test_host_copies_are_isolated_from_in_place_updates(tmp_path: Path) -> None:
    state = cpu_state()
    expected = clone(state)
    model = Model(state)
    model.hold()
    future = ckptable.save_async(model, tmp_path / "ckpt")
    assert model.entered.wait(30)
    mutate(model.state)
    model.release.set()
    assert_states_same(Model.from_checkpoint(future.result(timeout=60)).state, expected)


@pytest.mark.usefixtures("host_copies")
def test_the_host_block_is_reused_grown_and_freed(tmp_path: Path) -> None:
    model = Model({"w": torch.randn(1 << 20), "b": torch.randn(100).bfloat16()})
    ckptable.save_async(model, tmp_path / "a").result(timeout=60)
    [host] = _default_pool.idle_host_arenas
    address = host.address
    ckptable.save_async(model, tmp_path / "b").result(timeout=60)
    assert _default_pool.idle_host_arenas == [host] and host.address == address
    model.state["more"] = torch.randn(host.capacity // 4 + 1)  # no longer fits
    path = ckptable.save_async(model, tmp_path / "c").result(timeout=60)
    [grown] = _default_pool.idle_host_arenas
    assert grown is not host and grown.capacity >= 1.25 * host.capacity
    assert host.tensor is None  # the small block was freed, not kept
    assert_states_same(Model.from_checkpoint(path).state, model.state)
    ckptable.release_snapshot_memory()
    assert _default_pool.idle_host_arenas == [] and grown.tensor is None


@pytest.mark.usefixtures("host_copies")
def test_host_copies_with_another_format_are_tensors_again(tmp_path: Path) -> None:
    state = safetensors_fit(cpu_state())
    path = ckptable.save_async(Model(state), tmp_path / "st", format="safetensors").result(60)
    assert Path(path, "state.safetensors").exists()
    assert_states_same(Model.from_checkpoint(path).state, state)


class Scaled:
    """An object whose rebuild needs a real tensor (as a tensor subclass's may)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.total = float(tensor.sum())

    def __reduce__(self) -> Any:
        return Scaled, (self.tensor,)


@pytest.mark.usefixtures("host_copies")
def test_rebuilds_that_need_real_tensors_get_them(tmp_path: Path) -> None:
    state = {"scaled": Scaled(torch.arange(4.0)), "w": torch.randn(3)}
    path = ckptable.save_async(Model(state), tmp_path / "ckpt").result(timeout=60)
    restored = Model.from_checkpoint(path).state
    assert restored["scaled"].total == 6.0
    assert_same(restored["w"], state["w"])


@pytest.mark.usefixtures("host_copies")
def test_a_manager_reuses_and_frees_its_host_block(tmp_path: Path) -> None:
    model = Model({"w": torch.randn(1 << 16)})
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    manager.save_async(model, 1).result(timeout=60)
    [host] = manager._pool.idle_host_arenas
    model.state["w"].mul_(2)
    manager.save_async(model, 2).result(timeout=60)
    assert manager._pool.idle_host_arenas == [host]
    fresh = Model()
    assert manager.restore_latest(fresh) == 2
    assert_same(fresh.state["w"], model.state["w"])
    manager.close()
    assert manager._pool.idle_bytes == 0 and host.tensor is None


def test_a_host_copy_record_names_the_saved_device() -> None:
    """What a GPU machine writes for a cuda:0 tensor: reduce_tensor's record with the
    device string; it loads anywhere with map_location."""
    tensors = {
        "bf16_grad": torch.randn(4).bfloat16().requires_grad_(True),
        "f32": torch.randn(2, 3),
        "fp8": random_tensor(torch.float8_e4m3fn),
    }
    for key, tensor in tensors.items():
        record, found = snapshot_torch._with_device(*reduce_tensor(tensor), "cuda:0")
        assert found, key
        stream = io.BytesIO()
        pickler_class()(stream, protocol=5).dump(_Reduced(record))
        assert b"cuda:0" in stream.getvalue()
        loaded = load_pickle(io.BytesIO(stream.getvalue()), placement=TensorPlacement("cpu"))
        assert_same(loaded, tensor)


class _Reduced:
    def __init__(self, record: Any) -> None:
        self.record = record

    def __reduce__(self) -> Any:
        return self.record


def test_skeletons_name_a_placeholder_only_ckptable_resolves() -> None:
    with pytest.raises(RuntimeError, match="placeholder"):
        pickle.loads(pickle.dumps(snapshot_torch.device_tensor))(0)


# ------------------------------------------------------------------------- real GPUs


def to_cuda(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on cuda:0; contiguous ones moved as bytes (torch has no copy kernel for
    some dtypes: bits16...)."""
    if tensor.is_contiguous() and not tensor.is_conj():
        raw = tensor.reshape(-1).view(torch.uint8).to("cuda:0")
        return raw.view(tensor.dtype).view(tensor.shape)
    return tensor.to("cuda:0")


def cuda_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        key: to_cuda(value) if isinstance(value, torch.Tensor) else value
        for key, value in cpu_state().items()
        if key not in ("grad_bf16", "param", "nested")
    }
    state["grad_bf16"] = torch.randn(4, device="cuda:0").bfloat16().requires_grad_(True)
    state["param"] = torch.nn.Parameter(torch.randn(3, 3, device="cuda:0"))
    state["nested"] = {"w": torch.randn(2, 2, device="cuda:0"), "cpu": torch.randn(3)}
    return state


@pytest.mark.parametrize("fmt", ["cloudpickle", "safetensors"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_round_trips_back_onto_the_gpu(tmp_path: Path, fmt: str) -> None:
    state = cuda_state()
    if fmt == "safetensors":
        state = safetensors_fit(state)
    ckptable.release_snapshot_memory()
    path = ckptable.save_async(Model(state), tmp_path / "ckpt", format=fmt).result(60)
    [host] = _default_pool.idle_host_arenas
    assert host.pinned and host.tensor.is_pinned()
    assert_states_same(Model.from_checkpoint(path).state, state)
    if fmt == "cloudpickle":
        raw = Path(path, "state.pkl").read_bytes()
        assert b"_load_from_bytes" not in raw and b"cuda:0" in raw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_updates_queued_before_or_made_after_the_call_are_handled(tmp_path: Path) -> None:
    """The copy sees the kernels queued before the call (it waits for the current
    stream) and none of the in-place updates made after it returns."""
    a = torch.randn(4096, 4096, device="cuda:0")
    out = torch.empty(4096, 4096, device="cuda:0")
    torch.matmul(a, a, out=out)  # queued, likely still running at the call
    model = Model({"out": out, "w": torch.randn(1 << 20, device="cuda:0")})
    model.hold()
    future = ckptable.save_async(model, tmp_path / "ckpt")
    for _ in range(3):
        out.add_(1.0)  # right after the call, on the same (current) stream
        model.state["w"].mul_(-1.0)
    torch.cuda.synchronize()
    model.release.set()
    path = future.result(timeout=60)
    restored = Model.from_checkpoint(path).state
    assert torch.equal(restored["out"], out - 3.0)
    assert torch.equal(restored["w"], -model.state["w"])
    assert restored["out"].device == out.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pinned_block_is_reused_and_blocks_briefly(tmp_path: Path) -> None:
    """Prints the caller's blocked time against a pinned copy of the same bytes."""
    ckptable.release_snapshot_memory()
    state = {f"w{i}": torch.randn(1 << 26, device="cuda:0") for i in range(4)}  # 1 GiB
    model = Model(state)
    ckptable.save_async(model, tmp_path / "warm", durable=False).result(120)
    [host] = _default_pool.idle_host_arenas
    address = host.address
    blocked = []
    for i in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        future = ckptable.save_async(model, tmp_path / f"s{i}", durable=False)
        blocked.append(time.perf_counter() - start)
        future.result(120)
        assert _default_pool.idle_host_arenas == [host] and host.address == address
    pinned = torch.empty(1 << 28, dtype=torch.float32, pin_memory=True)
    copies = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        offset = 0
        for tensor in state.values():
            pinned[offset : offset + tensor.numel()].copy_(tensor, non_blocking=True)
            offset += tensor.numel()
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - start)
    print(
        f"\n1 GiB on cuda:0: save_async blocked {min(blocked) * 1e3:.1f} ms "
        f"(median {sorted(blocked)[1] * 1e3:.1f} ms); pinned device-to-host copy "
        f"{min(copies) * 1e3:.1f} ms; ratio {min(blocked) / min(copies):.2f}x"
    )
    restored = Model.from_checkpoint(tmp_path / "s2").state
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    ckptable.release_snapshot_memory()
