"""Safe loading (``safe=True``) of torch tensors: the records ckptable writes load without
``add_safe_classes``; every record that abuses them is refused before it runs.

The abusive records are crafted with objects whose ``__reduce__`` returns torch's own
functions with arguments no saver writes (pickle then names only torch's globals, as a
real record does), or, where an order of opcodes no pickler emits is needed, with raw
opcodes. Each is saved as a level's state, the checkpoint resealed, and restored with
``safe=True``: it must raise :class:`UnsafeCheckpointError` naming the state file, with
no tensor rebuilt (a spy counts the calls that would build one).
"""

from __future__ import annotations

import builtins
import collections
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptable import UnsafeCheckpointError
from ckptable._torch_placement import TensorPlacement
from helpers import reseal
from test_torch_tensors import (
    ALL_DTYPES,
    Holder,
    SavedOn,
    assert_same_tensor,
    moved_warnings,
    old_format_bytes,
    random_tensor,
    write_old_format,
)

REBUILD = torch._utils._rebuild_device_tensor_from_numpy
VIEW = torch._C.TensorBase.view
REQUIRES_GRAD_ = torch._C.TensorBase.requires_grad_
PARAMETER = torch._utils._rebuild_parameter
REBUILD_V2 = torch._utils._rebuild_tensor_v2
LOAD_FROM_BYTES = torch.storage._load_from_bytes


class Call:
    """Pickles as ``fn(*args)`` (with ``state`` applied by BUILD if given)."""

    def __init__(self, fn: Any, *args: Any, state: Any = None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self) -> Any:
        if self.state is None:
            return self.fn, self.args
        return self.fn, self.args, self.state


def floats(n: int = 3) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


def int16_record(device: str = "cpu") -> Call:
    return Call(REBUILD, np.arange(4, dtype=np.int16), torch.int16, device, False)


def storage_bytes(tensor: torch.Tensor) -> bytes:
    """What torch's reducer writes for ``tensor``'s storage (legacy torch.save bytes)."""
    reduced = tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return reduced[1][0].__reduce__()[1][0]  # type: ignore[no-any-return]


def storage_record(data: bytes | None = None) -> Call:
    return Call(LOAD_FROM_BYTES, storage_bytes(torch.arange(6.0)) if data is None else data)


def v2_record(size: Any = (2, 3), stride: Any = (3, 1), offset: Any = 0, **kw: Any) -> Call:
    hooks = kw.get("hooks", collections.OrderedDict())
    storage = kw.get("storage", storage_record())
    return Call(REBUILD_V2, storage, offset, size, stride, kw.get("grad", False), hooks)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the placement calls that build tensors, in order."""
    calls: list[str] = []
    for name in ("rebuild_from_numpy", "load_storage", "rebuild_tensor_v2"):
        original = getattr(TensorPlacement, name)

        def record(self: Any, *args: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _f(self, *args, **kw)

        monkeypatch.setattr(TensorPlacement, name, record)
    return calls


def save(tmp_path: Path, state: dict) -> str:
    obj = Holder()
    obj.state = state
    return obj.save_to_path(tmp_path / "ckpt")  # type: ignore[no-any-return]


def restore_safe(path: str, **kwargs: Any) -> dict:
    new = Holder()
    new.restore_from_path(path, safe=True, **kwargs)
    return new.state


def assert_refused(tmp_path: Path, record: Any, match: str) -> None:
    path = save(tmp_path, {"x": record})
    with pytest.raises(UnsafeCheckpointError, match=match) as caught:
        restore_safe(path)
    state_file = str(Path(path, "state.pkl"))
    assert caught.value.path == state_file
    assert state_file in str(caught.value)


# --------------------------------------------------------------------------------------
# What ckptable writes loads
# --------------------------------------------------------------------------------------


def test_every_dtype_and_parameters_load_safely(tmp_path: Path) -> None:
    """All dtypes, views, 0-d, requires_grad and Parameters, with no add_safe_classes."""
    state: dict[str, Any] = {str(d): random_tensor(d) for d in ALL_DTYPES}
    state["grad_bf16"] = random_tensor(torch.bfloat16, (4,)).requires_grad_(True)
    state["grad_f32"] = torch.randn(3, requires_grad=True)
    state["param"] = torch.nn.Parameter(torch.randn(2, 2))
    state["frozen_bf16"] = torch.nn.Parameter(torch.randn(3).bfloat16(), requires_grad=False)
    state["scalar"] = torch.tensor(3.5)
    state["view"] = torch.arange(12.0).reshape(3, 4).t()
    state["big"] = torch.randn(1 << 19)
    restored = restore_safe(save(tmp_path, state))
    for key, tensor in state.items():
        if key == "view":
            assert torch.equal(restored[key], tensor)
        else:
            assert_same_tensor(restored[key], tensor)


def test_safe_mode_places_tensors_like_the_default(tmp_path: Path) -> None:
    """Tensors saved on a missing device: the CPU and one warning, or map_location."""
    path = save(
        tmp_path, {"a": SavedOn(torch.ones(2), "cuda:0"), "b": SavedOn(torch.zeros(1), "cuda:1")}
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = restore_safe(path)
    assert torch.equal(restored["a"], torch.ones(2))
    (message,) = moved_warnings(record)
    assert message.startswith("2 tensors saved on cuda:0 (1), cuda:1 (1)")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restore_safe(path, map_location={"cuda:0": "cpu", "cuda:1": "cpu"})
    assert moved_warnings(record) == []


def test_old_torch_reducer_tensors_load_safely(tmp_path: Path) -> None:
    """Tensors pickled by torch itself (torch.save bytes inside the pickle) load in safe
    mode through torch.load(weights_only=True), from a GPU too."""
    tensors = {
        "w": torch.randn(3, 4),
        "view": torch.arange(12.0).reshape(3, 4)[1:, ::2],
        "p": torch.nn.Parameter(torch.randn(2)),
        "bf16": torch.randn(5).bfloat16(),
        "empty": torch.zeros(0, 3),
    }
    path = write_old_format(tmp_path, tensors, "cuda:0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = restore_safe(path)
    for key, tensor in tensors.items():
        assert torch.equal(restored[key], tensor), key
        assert type(restored[key]) is type(tensor)
    assert len(moved_warnings(record)) == 1


# --------------------------------------------------------------------------------------
# Abused records: the new form
# --------------------------------------------------------------------------------------

ABUSED_NUMPY_RECORDS = {
    "callable as dtype": (
        Call(REBUILD, floats(), builtins.list, "cpu", False),
        "not a torch.dtype",
    ),
    "numpy dtype as dtype": (
        Call(REBUILD, floats(), np.dtype("float32"), "cpu", False),
        "not a torch.dtype",
    ),
    "dtype that converts": (
        Call(REBUILD, floats(), torch.float16, "cpu", False),
        "holds torch.float32",
    ),
    "bytes as data": (Call(REBUILD, b"\0" * 12, torch.float32, "cpu", False), "not a numpy array"),
    "list as data": (Call(REBUILD, [1.0, 2.0], torch.float32, "cpu", False), "not a numpy array"),
    "object array": (
        Call(REBUILD, np.array([1, "a"], dtype=object), torch.float32, "cpu", False),
        "Refusing|object",
    ),
    "negative device index": (
        Call(REBUILD, floats(), torch.float32, "cuda:-1", False),
        "not a device torch knows",
    ),
    "not a device": (
        Call(REBUILD, floats(), torch.float32, "nope", False),
        "not a device torch knows",
    ),
    "device as a list": (
        Call(REBUILD, floats(), torch.float32, ["cpu"], False),
        "not a device string",
    ),
    "device too long": (
        Call(REBUILD, floats(), torch.float32, "cpu" + " " * 100, False),
        "not a device string",
    ),
    "meta device": (Call(REBUILD, floats(), torch.float32, "meta", False), "device type 'meta'"),
    "huge device index": (
        Call(REBUILD, floats(), torch.float32, "cuda:99999999", False),
        "not written as torch writes it",
    ),
    "device index wrapping": (
        Call(REBUILD, floats(), torch.float32, "cuda:70000", False),
        "not written as torch writes it",
    ),
    "device in capitals": (
        Call(REBUILD, floats(), torch.float32, "CUDA:0", False),
        "not a device torch knows",
    ),
    "requires_grad as int": (Call(REBUILD, floats(), torch.float32, "cpu", 1), "not a bool"),
    "grad on ints": (
        Call(REBUILD, np.arange(3), torch.int64, "cpu", True),
        "cannot require gradients",
    ),
    "too many arguments": (Call(REBUILD, floats(), torch.float32, "cpu", False, None), "arguments"),
    "view as float32": (Call(VIEW, int16_record(), torch.float32), "only dtypes numpy lacks"),
    "view of another width": (Call(VIEW, int16_record(), torch.float8_e4m3fn), "another item size"),
    "view of a float tensor": (
        Call(VIEW, Call(REBUILD, floats(), torch.float32, "cpu", False), torch.bfloat16),
        "records view integers only",
    ),
    "view of an array": (Call(VIEW, np.arange(4, dtype=np.int16), torch.bfloat16), "not a tensor"),
    "view as a callable": (Call(VIEW, int16_record(), builtins.list), "only dtypes numpy lacks"),
    "requires_grad_ of ints": (
        Call(REQUIRES_GRAD_, int16_record(), True),
        "cannot require gradients",
    ),
    "requires_grad_ non-bool": (
        Call(REQUIRES_GRAD_, Call(VIEW, int16_record(), torch.bfloat16), "yes"),
        "not a bool",
    ),
    "other TensorBase method": (
        Call(torch._C.TensorBase.fill_, int16_record(), 7),
        "TensorBase.fill_",
    ),
    "other TensorBase method set_": (
        Call(torch._C.TensorBase.set_, int16_record()),
        "TensorBase.set_",
    ),
    "TensorBase called": (Call(torch._C.TensorBase), "only named, never called"),
    "parameter hooks": (
        Call(PARAMETER, int16_record(), False, collections.OrderedDict(h=builtins.list)),
        "empty OrderedDict",
    ),
    "parameter hooks as dict": (Call(PARAMETER, int16_record(), False, {}), "empty OrderedDict"),
    "parameter of an array": (
        Call(PARAMETER, floats(), False, collections.OrderedDict()),
        "not a tensor",
    ),
    "parameter requires_grad int": (
        Call(
            PARAMETER,
            Call(REBUILD, floats(), torch.float32, "cpu", False),
            1,
            collections.OrderedDict(),
        ),
        "not a bool",
    ),
    "BUILD on a tensor": (
        Call(REBUILD, floats(), torch.float32, "cpu", False, state=(None, None, None, None)),
        "sets the state of a Tensor",
    ),
    "BUILD hooks onto a tensor": (
        Call(REBUILD, floats(), torch.float32, "cpu", False, state={"_backward_hooks": {}}),
        "sets the state of a Tensor",
    ),
    "other torch function": (Call(torch.load, b""), "torch.serialization.load"),
    "torch global not a dtype": (Call(builtins.getattr, torch, "manual_seed"), "Refusing|getattr"),
}


@pytest.mark.parametrize("name", sorted(ABUSED_NUMPY_RECORDS))
def test_abused_records_are_refused_unrun(tmp_path: Path, spy: list[str], name: str) -> None:
    record, match = ABUSED_NUMPY_RECORDS[name]
    assert_refused(tmp_path, record, match)
    # nothing was built past the record's first call: only well-formed inner records ran
    assert spy.count("rebuild_from_numpy") <= 1
    assert "load_storage" not in spy


def test_an_array_still_waiting_for_its_build_is_refused(tmp_path: Path, spy: list[str]) -> None:
    """A record handed the array numpy's _reconstruct made before its BUILD (numpy would
    free its memory under the tensor): raw opcodes, since no pickler writes that."""
    module = "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
    raw = b"".join(
        [
            pickle.PROTO + b"\x04",
            pickle.GLOBAL + b"torch._utils\n_rebuild_device_tensor_from_numpy\n",
            pickle.MARK,
            pickle.GLOBAL + f"{module}\n_reconstruct\n".encode(),
            pickle.GLOBAL + b"numpy\nndarray\n",
            pickle.BININT1 + b"\x03" + pickle.TUPLE1,
            pickle.SHORT_BINUNICODE + b"\x01b",
            pickle.TUPLE3 + pickle.REDUCE,
            pickle.GLOBAL + b"torch\nint8\n",
            pickle.SHORT_BINUNICODE + b"\x03cpu",
            pickle.NEWFALSE,
            pickle.TUPLE + pickle.REDUCE + pickle.STOP,
        ]
    )
    path = save(tmp_path, {"x": 0})
    Path(path, "state.pkl").write_bytes(raw)
    reseal(path)
    with pytest.raises(UnsafeCheckpointError, match="still waiting for its data"):
        restore_safe(path)
    assert spy == []


# --------------------------------------------------------------------------------------
# Abused records: torch's own reducer
# --------------------------------------------------------------------------------------


def legacy_with(count: int | None = None, location: str | None = None, extra: bytes = b"") -> bytes:
    """Legacy storage bytes of 6 floats with the item count or location changed."""
    data = storage_bytes(torch.arange(6.0))
    if location is not None:
        data = data.replace(
            b"\x03\x00\x00\x00cpu", len(location).to_bytes(4, "little") + location.encode()
        )
    if count is not None:
        data = data[:-32] + count.to_bytes(8, "little") + data[-24:]
    return data + extra


ABUSED_OLD_RECORDS = {
    "size past the storage": (v2_record(size=(7,), stride=(1,)), "reaches item 6"),
    "stride past the storage": (v2_record(size=(2, 3), stride=(3, 2)), "reaches item"),
    "offset past the storage": (v2_record(size=(1,), stride=(1,), offset=6), "reaches item 6"),
    "overflowing size": (v2_record(size=(2**62, 2**62), stride=(1, 1)), "out of range"),
    "negative stride": (v2_record(size=(3,), stride=(-1,), offset=2), "out of range"),
    "negative offset": (v2_record(size=(1,), stride=(1,), offset=-1), "storage offset"),
    "size as a list": (v2_record(size=[2, 3], stride=(3, 1)), "tuples of the same length"),
    "mismatched stride": (v2_record(size=(2, 3), stride=(1,)), "tuples of the same length"),
    "hooks": (v2_record(hooks=collections.OrderedDict(h=builtins.list)), "empty OrderedDict"),
    "storage not loaded here": (
        v2_record(storage=np.zeros(6, np.float32)),
        "not loaded by this pickle",
    ),
    "grad on a long storage": (
        v2_record(
            size=(1,),
            stride=(1,),
            storage=storage_record(storage_bytes(torch.arange(3))),
            grad=True,
        ),
        "cannot require gradients",
    ),
    "storage from a str": (Call(LOAD_FROM_BYTES, "abc"), "not bytes"),
    "storage as a zip torch.save": (
        storage_record(b"PK\x03\x04" + b"\0" * 40),
        "legacy storage layout",
    ),
    "storage count lies": (storage_record(legacy_with(count=2**40)), "size field does not match"),
    "storage with extra bytes": (storage_record(legacy_with(extra=b"\0" * 8)), "bytes follow"),
    "storage location not a device": (
        storage_record(legacy_with(location="nope")),
        "location 'nope'",
    ),
    "storage pickle with code": (
        storage_record(pickle.dumps(print, protocol=2) * 5),
        "legacy storage layout",
    ),
}


@pytest.mark.parametrize("name", sorted(ABUSED_OLD_RECORDS))
def test_abused_torch_reducer_records_are_refused(
    tmp_path: Path, spy: list[str], name: str
) -> None:
    record, match = ABUSED_OLD_RECORDS[name]
    assert_refused(tmp_path, record, match)
    assert "rebuild_tensor_v2" not in spy
    if name.startswith("storage"):
        assert "load_storage" not in spy  # torch.load never saw the bytes


def test_the_legacy_layout_check_accepts_what_torch_writes() -> None:
    from ckptable._safe_torch import legacy_storage_problem

    for tensor in (
        torch.arange(6.0),
        torch.zeros(0),
        torch.randn(3).bfloat16(),
        torch.tensor([True]),
    ):
        assert legacy_storage_problem(storage_bytes(tensor)) is None
    blob = old_format_bytes({"w": torch.ones(2)}, "cuda:1")
    assert b"cuda:1" in blob


def test_safe_state_with_a_tensor_subclass_is_refused(tmp_path: Path) -> None:
    """What the record cannot express (torch's reducer of a sparse tensor, say) is not
    loaded in safe mode: it names torch functions outside the allowlist."""
    path = save(tmp_path, {"sparse": torch.eye(3).to_sparse()})
    with pytest.raises(UnsafeCheckpointError, match="_rebuild_sparse_tensor"):
        restore_safe(path)


def test_plain_pickle_of_a_crafted_record_would_have_run(tmp_path: Path) -> None:
    """The refusals above matter: the same bytes, loaded plainly, do run torch's code
    (here: Tensor.fill_ through getattr on TensorBase)."""
    blob = pickle.dumps(Call(torch._C.TensorBase.fill_, int16_record(), 7), protocol=5)
    assert torch.equal(pickle.load(io.BytesIO(blob)), torch.full((4,), 7, dtype=torch.int16))
