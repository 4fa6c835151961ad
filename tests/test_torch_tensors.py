"""Torch tensors in the default (cloudpickle) format: written as numpy arrays plus a record
naming torch's own rebuild function, and placed on devices by ``map_location``.

A CPU-only machine cannot make CUDA tensors, so tensors "saved on cuda:0" are crafted:
for ckptable's records, :class:`SavedOn` writes the record ckptable writes for the
tensor with another device string in it; for torch's own reducer (older checkpoints,
RLlib's), torch's ``location_tag`` is patched while pickling, as a GPU would tag it.
``tests/test_torch_gpu.py`` runs the real thing on a GPU.
"""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptable import Checkpointable, CheckpointManager
from ckptable._pickle_scan import scan_pickle
from ckptable._restore_session import RestoreOptions, non_default_options
from ckptable._torch import _Call, reduce_tensor
from ckptable.errors import CheckpointError
from ckptable.testing import roundtrip
from helpers import reseal

REPO = Path(__file__).resolve().parents[1]

NUMPY_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
]  # fmt: skip
VIEWED_DTYPES = [
    torch.bfloat16, torch.complex32, torch.float8_e4m3fn, torch.float8_e4m3fnuz,
    torch.float8_e5m2, torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
    torch.bits8, torch.bits16,
]  # fmt: skip
ALL_DTYPES = NUMPY_DTYPES + VIEWED_DTYPES


class Holder(Checkpointable):
    """A level whose state is whatever it was given (tensors anywhere in it)."""

    def __init__(self, *args: Any, children: dict[str, Any] | None = None) -> None:
        self.args = args
        self.state: dict[str, Any] = {}
        self.children = dict(children or {})
        self.set_calls = 0

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> dict:
        state = dict(self.state)
        for name, child in self.children.items():
            if self._check_component(name, components, not_components):
                state[name] = child.get_state(self._get_subcomponents(name, components))
        return state

    def set_state(self, state: dict) -> None:
        self.set_calls += 1
        for name, child in self.children.items():
            if name in state:
                child.set_state(state[name])
        self.state = {k: v for k, v in state.items() if k not in self.children}

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict]:
        return self.args, {}

    def get_checkpointable_components(self) -> list[tuple[str, Any]]:
        return list(self.children.items())


class SavedOn:
    """Pickles as the record ckptable writes for ``tensor``, with ``device`` as the device
    it was saved from (what a GPU machine writes for a CUDA tensor)."""

    def __init__(self, tensor: torch.Tensor, device: str) -> None:
        self.tensor = tensor
        self.device = device

    def __reduce__(self) -> Any:
        if isinstance(self.tensor, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (
                SavedOn(self.tensor.detach(), self.device),
                self.tensor.requires_grad,
                collections.OrderedDict(),
            )
        return _with_device(*reduce_tensor(self.tensor), self.device)


def _with_device(fn: Any, args: tuple, device: str) -> Any:
    if fn is torch._utils._rebuild_device_tensor_from_numpy:
        return fn, (args[0], args[1], device, args[3])
    inner = args[0]
    return fn, (_Call(*_with_device(inner.fn, inner.args, device)), *args[1:])


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> Any:
    """A tensor of ``dtype`` from random bytes (NaN payloads, subnormals and all)."""
    gen = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    if dtype is torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equal iff bit-for-bit equal (NaN payloads too)."""
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8)


def assert_same_tensor(actual: Any, expected: torch.Tensor) -> None:
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.requires_grad == expected.requires_grad
    assert actual.device.type == "cpu"
    assert torch.equal(bits(actual), bits(expected))


def save_and_restore(tmp_path: Path, state: dict, **restore: Any) -> dict:
    obj = Holder()
    obj.state = state
    path = obj.save_to_path(tmp_path / "ckpt")
    new = Holder()
    new.restore_from_path(path, **restore)
    return new.state


def pickle_globals(path: Path) -> set[str]:
    """Every global a pickle file names, as ``module.name`` (loading it plainly)."""
    names: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(path, "rb") as stream:
        Recording(stream).load()
    return names


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    """Each dtype comes back with its dtype, shape and exact bits (random bytes: NaN
    payloads, infinities, subnormals), also 0-d and empty, and with requires_grad where
    the dtype can have it."""
    grad = dtype.is_floating_point or dtype.is_complex
    state = {
        "t": random_tensor(dtype),
        "scalar": random_tensor(dtype, (), seed=1),
        "empty": random_tensor(dtype, (0, 4)),
        "nested": {
            "list": [random_tensor(dtype, (2,), seed=2)],
            "tuple": (random_tensor(dtype, (1, 1, 3)),),
        },
    }
    if grad:
        state["grad"] = random_tensor(dtype, (4,), seed=3).requires_grad_(True)
    restored = save_and_restore(tmp_path, state)
    assert_same_tensor(restored["t"], state["t"])
    assert_same_tensor(restored["scalar"], state["scalar"])
    assert_same_tensor(restored["empty"], state["empty"])
    assert_same_tensor(restored["nested"]["list"][0], state["nested"]["list"][0])
    assert isinstance(restored["nested"]["tuple"], tuple)
    assert_same_tensor(restored["nested"]["tuple"][0], state["nested"]["tuple"][0])
    if grad:
        assert_same_tensor(restored["grad"], state["grad"])
        assert restored["grad"].is_leaf


def test_views_bits_and_parameters_round_trip(tmp_path: Path) -> None:
    """Non-contiguous views come back contiguous with their values; conjugate and
    negative bits are resolved into the values; Parameters stay Parameters (with or
    without requires_grad, bf16 too); one tensor object twice stays one object."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    complex_base = torch.randn(3, 4, dtype=torch.complex64)
    shared = torch.randn(5)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base.reshape(-1)[7:13],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "conj": complex_base.conj(),
        "neg": torch._neg_view(complex_base),
        "param": torch.nn.Parameter(torch.randn(3, 3)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "bf16_param": torch.nn.Parameter(torch.randn(4).to(torch.bfloat16)),
        "shared": [shared, shared],
    }
    assert state["conj"].is_conj() and state["neg"].is_neg()
    restored = save_and_restore(tmp_path, state)
    for key in ("transposed", "strided", "offset", "expanded"):
        assert torch.equal(restored[key], state[key]), key
        assert restored[key].is_contiguous()
    assert torch.equal(restored["conj"], complex_base.conj().resolve_conj())
    assert not restored["conj"].is_conj()
    assert torch.equal(restored["neg"], -complex_base)
    for key in ("param", "frozen", "bf16_param"):
        assert_same_tensor(restored[key], state[key])
    assert restored["shared"][0] is restored["shared"][1]


def test_big_tensors_are_out_of_band_payloads_read_into_place(tmp_path: Path) -> None:
    """A big tensor's bytes are one payload the pickle scan reads into its own buffer
    (no torch.save inside the pickle); the restored tensor shares that buffer's memory."""
    big = torch.randn(1 << 19)  # 2 MiB
    obj = Holder()
    obj.state = {"big": big, "bf16": big.to(torch.bfloat16)}
    path = Path(obj.save_to_path(tmp_path / "ckpt"))
    with open(path / "state.pkl", "rb") as stream:
        scanned = scan_pickle(stream, "read")
    assert scanned is not None
    assert sorted(len(b) for b in scanned.buffers) == [big.nbytes // 2, big.nbytes]
    restored = Holder()
    restored.restore_from_path(path)
    assert torch.equal(restored.state["big"], big)
    assert torch.equal(restored.state["bf16"], big.to(torch.bfloat16))
    assert "torch.storage._load_from_bytes" not in pickle_globals(path / "state.pkl")


def _mapped_file_of(address: int) -> str | None:
    """The file whose mapping holds ``address`` in this process (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def test_mmap_restore_gives_tensors_on_the_checkpoints_pages(tmp_path: Path) -> None:
    """With mmap=True a tensor (every dtype, the viewed ones too) lives on the checkpoint
    file's own pages, not a copy (so a big state opens without being read), and is writable
    copy-on-write: a write changes this process's tensor, never the file."""
    big = torch.randn(1 << 19)
    state = {"big": big, "bf16": big.to(torch.bfloat16), "half": big.to(torch.float16)}
    path = tmp_path / "ckpt"
    holder = Holder()
    holder.state = state
    holder.save_to_path(path)
    state_file = str((path / "state.pkl").resolve())
    before = (path / "state.pkl").read_bytes()
    restored = Holder()
    restored.restore_from_path(path, mmap=True)
    for key, tensor in restored.state.items():
        assert _mapped_file_of(tensor.data_ptr()) == state_file, key
        assert torch.equal(tensor, state[key]), key
    restored.state["big"].add_(1.0)
    assert torch.equal(restored.state["big"], big + 1.0)
    assert (path / "state.pkl").read_bytes() == before
    again = Holder()
    again.restore_from_path(path, mmap=True)
    assert torch.equal(again.state["big"], big)
    # NumPy arrays of the same file stay read-only views, as mmap=True always gave them.
    holder.state = {"array": np.arange(1 << 17, dtype=np.float64)}
    holder.save_to_path(tmp_path / "arrays")
    arrays = Holder()
    arrays.restore_from_path(tmp_path / "arrays", mmap=True)
    assert not arrays.state["array"].flags.writeable


def test_pickle_names_only_torch_numpy_and_builtins(tmp_path: Path) -> None:
    """The records name torch's and numpy's own functions (plus getattr and
    OrderedDict), never ckptable: RLlib reads them without ckptable."""
    state = {
        "f": torch.randn(3),
        "bf16": torch.randn(3).to(torch.bfloat16).requires_grad_(True),
        "p": torch.nn.Parameter(torch.randn(2)),
    }
    obj = Holder()
    obj.state = state
    path = Path(obj.save_to_path(tmp_path / "ckpt"))
    names = pickle_globals(path / "state.pkl")
    assert names == {
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_parameter",
        "torch.float32",
        "torch.bfloat16",
        "torch.int16",
        "torch._C.TensorBase",
        "builtins.getattr",
        "collections.OrderedDict",
        np.ndarray.__reduce_ex__(np.zeros(1), 5)[0].__module__ + "._frombuffer",
        "numpy.dtype",
    }


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_tensors_the_record_cannot_express_keep_torchs_reducer(tmp_path: Path) -> None:
    """Sparse and quantized tensors, and tensors with attributes of their own, still
    round trip, through torch's own reducer (documented)."""

    with_attribute = torch.randn(2)
    with_attribute.note = "kept"  # type: ignore[attr-defined]
    state = {
        "sparse": torch.randn(4, 4).relu().to_sparse(),
        "quantized": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
        "with_attribute": with_attribute,
        "plain": torch.randn(3),
    }
    restored = save_and_restore(tmp_path, state)
    assert torch.equal(restored["sparse"].to_dense(), state["sparse"].to_dense())
    assert torch.equal(restored["quantized"].int_repr(), state["quantized"].int_repr())
    assert restored["with_attribute"].note == "kept"
    assert torch.equal(restored["plain"], state["plain"])


def test_import_ckptable_and_non_tensor_pipelines_never_import_torch(tmp_path: Path) -> None:
    """In a fresh interpreter: importing ckptable, saving and restoring (every format and
    mode, from_checkpoint, map_location="cpu", the manager, async saves) a state without
    tensors imports no torch."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        import ckptable
        from ckptable import Checkpointable
        assert "torch" not in sys.modules

        class Plain(Checkpointable):
            def __init__(self):
                self.s = {{"w": np.arange(1 << 18, dtype=np.float32), "n": [1, (2, 3)]}}
            def get_state(self, components=None, *, not_components=None, **kw):
                return dict(self.s)
            def set_state(self, state):
                self.s = dict(state)
            def get_ctor_args_and_kwargs(self):
                return (), {{}}

        root = {str(tmp_path)!r}
        for i, kwargs in enumerate([{{}}, {{"use_msgpack": True}}]):
            path = Plain().save_to_path(f"{{root}}/c{{i}}", **kwargs)
            Plain().restore_from_path(path)
            Plain().restore_from_path(path, safe=True)
            Plain().restore_from_path(path, mmap=True, map_location="cpu")
            Plain.from_checkpoint(path, map_location={{"cuda:0": "cpu"}})
            ckptable.verify_checkpoint(path)
        manager = ckptable.CheckpointManager(f"{{root}}/runs", keep_last=1)
        manager.save(Plain(), 1)
        manager.save_async(Plain(), 2).result()
        assert manager.restore_latest(Plain()) == 2
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_machine_without_torch_is_told_what_to_install(tmp_path: Path) -> None:
    """Restoring tensors where torch cannot be imported: IncompatibleCheckpointError
    naming the file and the extra to install (plain and safe restores)."""
    obj = Holder()
    obj.state = {"w": torch.randn(3)}
    path = obj.save_to_path(tmp_path / "ckpt")
    script = textwrap.dedent(
        f"""
        import sys

        class NoTorch:  # import torch fails, as where it is not installed
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NoTorch())
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ckptable import IncompatibleCheckpointError
        from ckptable._restore import RestoreOptions, decode_file
        from ckptable._formats import get_codec
        from ckptable._storage import LocalStorage

        for safe in (False, True):
            try:
                decode_file(LocalStorage(), {str(Path(path, "state.pkl"))!r},
                            get_codec("cloudpickle"), None, RestoreOptions(safe=safe))
            except IncompatibleCheckpointError as exc:
                assert "pip install 'ckptable[torch]'" in str(exc), exc
                assert "state.pkl" in str(exc), exc
            else:
                raise AssertionError("loaded without torch")
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------- read without ckptable


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_plain_pickle_reads_the_state_without_ckptable(tmp_path: Path) -> None:
    """A process with torch and numpy but without ckptable loads state.pkl with plain
    pickle.load and with cloudpickle: same tensors, dtypes, Parameters, requires_grad."""
    state = {
        "f32": torch.randn(1 << 18),
        "bf16": torch.randn(7).to(torch.bfloat16).requires_grad_(True),
        "fp8": torch.randn(5).to(torch.float8_e5m2),
        "c32": torch.randn(3, dtype=torch.complex64).to(torch.complex32),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "ints": [torch.arange(4).to(torch.uint16), torch.tensor(True)],
        "view": torch.arange(12.0).reshape(3, 4).t(),
    }
    obj = Holder()
    obj.state = state
    path = Path(obj.save_to_path(tmp_path / "ckpt"))
    torch.save(state, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import pickle, sys, cloudpickle, torch

        def bits(t):
            return t.detach().contiguous().reshape(-1).view(torch.uint8)

        def flat(s):
            return {{**s, "i0": s["ints"][0], "i1": s["ints"][1], "ints": None}}

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for load in (pickle.load, cloudpickle.load):
            with open({str(path / "state.pkl")!r}, "rb") as f:
                got = load(f)
            for key, want in flat(expected).items():
                have = flat(got)[key]
                if want is None:
                    continue
                assert type(have) is type(want), key
                assert have.dtype == want.dtype and have.shape == want.shape, key
                assert have.requires_grad == want.requires_grad, key
                assert torch.equal(bits(have), bits(want)), key
        assert "ckptable" not in sys.modules
        print("ok")
        """
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.rllib
def test_rllib_checkpointable_restores_tensors_without_ckptable(tmp_path: Path) -> None:
    """RLlib's own Checkpointable restores a ckptable checkpoint holding tensors, in a
    process that never imports ckptable."""
    child = Holder()
    child.state = {"w": torch.randn(3, 4), "p": torch.nn.Parameter(torch.randn(2))}
    obj = Holder(children={"module": child})
    obj.state = {"step": 3, "bf16": torch.randn(4).to(torch.bfloat16)}
    path = obj.save_to_path(tmp_path / "ckpt")
    torch.save({"root": obj.state, "child": child.state}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from ray.rllib.utils.checkpoints import Checkpointable

        class Level(Checkpointable):
            def __init__(self, children=None):
                self.children, self.state = dict(children or {{}}), {{}}
            def get_state(self, components=None, *, not_components=None, **kw):
                return dict(self.state)
            def set_state(self, state):
                for name, child in self.children.items():
                    if name in state:
                        child.set_state(state[name])
                self.state = {{k: v for k, v in state.items() if k not in self.children}}
            def get_ctor_args_and_kwargs(self):
                return (), {{}}
            def get_checkpointable_components(self):
                return list(self.children.items())

        child = Level()
        root = Level({{"module": child}})
        root.restore_from_path({path!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert root.state["step"] == 3
        assert torch.equal(root.state["bf16"], expected["root"]["bf16"])
        assert root.state["bf16"].dtype == torch.bfloat16
        assert torch.equal(child.state["w"], expected["child"]["w"])
        assert isinstance(child.state["p"], torch.nn.Parameter)
        assert torch.equal(child.state["p"], expected["child"]["p"])
        assert "ckptable" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- map_location


def cuda_state() -> tuple[dict, dict]:
    """A state "saved on" cuda:0 (three tensors, one a bf16 Parameter) and cuda:1 (one),
    and the tensors it holds."""
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16).requires_grad_(True),
        "p": torch.nn.Parameter(torch.randn(2).to(torch.bfloat16)),
        "c": torch.arange(6, dtype=torch.int64),
    }
    state = {
        "a": SavedOn(tensors["a"], "cuda:0"),
        "nested": {"b": SavedOn(tensors["b"], "cuda:0"), "p": SavedOn(tensors["p"], "cuda:0")},
        "c": SavedOn(tensors["c"], "cuda:1"),
    }
    return state, tensors


def check_cuda_state(restored: dict, tensors: dict) -> None:
    assert_same_tensor(restored["a"], tensors["a"])
    assert_same_tensor(restored["nested"]["b"], tensors["b"])
    assert_same_tensor(restored["nested"]["p"], tensors["p"])
    assert_same_tensor(restored["c"], tensors["c"])


def moved_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "restored to the CPU" in str(w.message)]


def test_default_puts_missing_device_tensors_on_cpu_with_one_warning(tmp_path: Path) -> None:
    """Tensors saved on devices this machine lacks go to the CPU; one UserWarning for the
    whole restore (two levels here) counts them by device and points at map_location."""
    state, tensors = cuda_state()
    child = Holder()
    child.state = {"more": SavedOn(torch.ones(2), "cuda:0")}
    obj = Holder(children={"child": child})
    obj.state = state
    path = obj.save_to_path(tmp_path / "ckpt")
    new_child = Holder()
    new = Holder(children={"child": new_child})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        new.restore_from_path(path)
    check_cuda_state(new.state, tensors)
    assert torch.equal(new_child.state["more"], torch.ones(2))
    (message,) = moved_warnings(record)
    assert message.startswith("5 tensors saved on cuda:0 (4), cuda:1 (1) were restored to the CPU")
    assert "map_location" in message
    (entry,) = [w for w in record if "restored to the CPU" in str(w.message)]
    assert entry.category is UserWarning
    assert entry.filename == __file__  # points at the caller's restore


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cuda:0": "cpu", "cuda:1": torch.device("cpu")}],
    ids=["str", "device", "dict"],
)
def test_explicit_map_location_places_without_warning(tmp_path: Path, map_location: Any) -> None:
    state, tensors = cuda_state()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = save_and_restore(tmp_path, state, map_location=map_location)
    check_cuda_state(restored, tensors)
    assert moved_warnings(record) == []


def test_dict_map_location_leaves_unnamed_devices_to_the_default(tmp_path: Path) -> None:
    state, tensors = cuda_state()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = save_and_restore(tmp_path, state, map_location={"cuda:0": "cpu"})
    check_cuda_state(restored, tensors)
    (message,) = moved_warnings(record)
    assert message.startswith("1 tensor saved on cuda:1 (1) was restored")


def test_callable_map_location(tmp_path: Path) -> None:
    """The callable gets each tensor built on the CPU and its saved device string, and
    returns the tensor to use; None means the default."""
    state, tensors = cuda_state()
    calls: list[tuple[str, str, tuple[int, ...]]] = []

    def to_cpu(tensor: torch.Tensor, saved: str) -> torch.Tensor | None:
        calls.append((saved, str(tensor.dtype), tuple(tensor.shape)))
        assert tensor.device.type == "cpu"
        return None if saved == "cuda:1" else tensor.to("cpu")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = save_and_restore(tmp_path, state, map_location=to_cpu)
    check_cuda_state(restored, tensors)
    # bf16 tensors reach the callable as the int16 tensor of their bytes (documented)
    assert sorted(calls) == [
        ("cuda:0", "torch.float32", (3, 4)),
        ("cuda:0", "torch.int16", (2,)),
        ("cuda:0", "torch.int16", (5,)),
        ("cuda:1", "torch.int64", (6,)),
    ]
    (message,) = moved_warnings(record)  # the one the callable left to the default
    assert message.startswith("1 tensor saved on cuda:1")


def test_bad_map_locations_fail_before_any_set_state(tmp_path: Path) -> None:
    state, _ = cuda_state()
    obj = Holder()
    obj.state = state
    path = obj.save_to_path(tmp_path / "ckpt")
    target = Holder()
    with pytest.raises(CheckpointError, match=r"sends tensors to 'cuda:0', which this machine"):
        target.restore_from_path(path, map_location="cuda:0")
    with pytest.raises(CheckpointError, match="it may only move tensors"):
        target.restore_from_path(path, map_location=lambda t, saved: t.double())
    with pytest.raises(CheckpointError, match="returned a str"):
        target.restore_from_path(path, map_location=lambda t, saved: "cpu")
    with pytest.raises(TypeError, match="map_location must be"):
        target.restore_from_path(path, map_location=3)
    with pytest.raises(TypeError, match="map_location as a dict"):
        target.restore_from_path(path, map_location={"cuda:0": 0})
    assert target.set_calls == 0


def old_format_bytes(state: dict, location: str) -> bytes:
    """``state`` pickled as torch's own reducer does (``torch.save`` of each storage inside
    the pickle: older ckptable checkpoints, RLlib's), tagged as saved on ``location``."""
    import cloudpickle
    import torch.serialization

    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location  # type: ignore[assignment]
    try:
        return cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        torch.serialization.location_tag = original


def write_old_format(tmp_path: Path, state: dict, location: str) -> str:
    obj = Holder()
    obj.state = {"placeholder": 0}
    path = obj.save_to_path(tmp_path / "old")
    Path(path, "state.pkl").write_bytes(old_format_bytes(state, location))
    reseal(path)
    return path


def test_old_torch_reducer_tensors_from_a_gpu_load_on_cpu(tmp_path: Path) -> None:
    """Tensors pickled by torch itself on a GPU machine (``_load_from_bytes`` calls
    torch.load, which refuses CUDA storages on a CPU-only machine) restore: default to
    the CPU with the warning, or as map_location says."""
    tensors = {
        "w": torch.randn(3, 4),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "p": torch.nn.Parameter(torch.randn(2)),
    }
    blob = old_format_bytes(tensors, "cuda:0")
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        pickle.loads(blob)  # what plain pickle (and ckptable before) does here
    path = write_old_format(tmp_path, tensors, "cuda:0")

    def check(restored: dict) -> None:
        for key, tensor in tensors.items():
            assert_same_tensor(restored[key], tensor)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        new = Holder()
        new.restore_from_path(path)
    check(new.state)
    (message,) = moved_warnings(record)
    assert message.startswith("3 tensors saved on cuda:0 (3) were restored to the CPU")

    seen: list[str] = []
    for map_location in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, None):
        if map_location is None:

            def map_location(tensor: torch.Tensor, saved: str) -> torch.Tensor:
                seen.append(saved)
                return tensor.to("cpu")

        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            new = Holder()
            new.restore_from_path(path, map_location=map_location)
        check(new.state)
        assert moved_warnings(record) == [], map_location
    assert seen == ["cuda:0"] * 3


def test_from_checkpoint_places_constructor_arguments_and_state(tmp_path: Path) -> None:
    """from_checkpoint takes map_location for the class file and the states alike."""
    obj = Holder(SavedOn(torch.arange(3.0), "cuda:0"))
    obj.state = {"a": SavedOn(torch.ones(2), "cuda:0")}
    path = obj.save_to_path(tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        new = Holder.from_checkpoint(path, map_location="cpu")
    assert moved_warnings(record) == []
    assert torch.equal(new.args[0], torch.arange(3.0))
    assert torch.equal(new.state["a"], torch.ones(2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Holder.from_checkpoint(path)
    assert len(moved_warnings(record)) == 2  # the class file, then the restore


def test_manager_and_roundtrip_pass_map_location(tmp_path: Path) -> None:
    state, tensors = cuda_state()
    obj = Holder()
    obj.state = state
    manager = CheckpointManager(tmp_path / "runs")
    manager.save(obj, 1)
    new = Holder()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert manager.restore_latest(new, map_location={"cuda:0": "cpu", "cuda:1": "cpu"}) == 1
    check_cuda_state(new.state, tensors)
    assert moved_warnings(record) == []

    plain = Holder()
    plain.state = {"w": torch.randn(3), "p": torch.nn.Parameter(torch.randn(2))}
    back = roundtrip(plain, tmp_path / "rt", map_location=torch.device("cpu"))
    assert torch.equal(back.state["w"], plain.state["w"])
    assert isinstance(back.state["p"], torch.nn.Parameter)


def test_map_location_travels_to_nested_restores_and_actors() -> None:
    """map_location is one of the options passed on to components that restore
    themselves and to Ray actors."""
    mapping = {"cuda:0": "cpu"}
    options = RestoreOptions(map_location=mapping, safe=True)
    assert non_default_options(options)["map_location"] is mapping
    assert options.for_actors() == {"safe": True, "map_location": mapping}
    assert "map_location" not in non_default_options(RestoreOptions())
