"""Torch benchmark: ckptable against torch.save, safetensors and PyTorch DCP, CPU and GPU.

What: a learner-like state (two float32 weight matrices, a bfloat16 embedding, Adam's
``exp_avg`` / ``exp_avg_sq`` for both weights, a step tensor per weight, the optimizer's
param groups) of ``--mib`` MiB (1 GiB) of CPU tensors, saved and restored in one process,
interleaved, under each ``--dir`` (default: the system temp dir and tmpfs ``/dev/shm``):

- ckptable ``save_to_path`` / ``restore_from_path`` in the default format (cloudpickle:
  tensors as numpy buffers) and ``format="safetensors"``; saves durable (the default:
  files and directories fsync'd) and ``durable=False``; restores plain and ``mmap=True``;
- ``torch.save`` / ``torch.load(weights_only=True)`` and ``torch.load(mmap=True,
  weights_only=True)``;
- safetensors ``save_file`` / ``load_file``: on the CPU ``load_file`` maps the file and
  reads nothing until a tensor is used, so ``load_file + copy`` (a ``clone()`` of every
  tensor: what a full restore leaves in memory) is reported too; the non-tensor values
  (param groups) go into the header's metadata as JSON;
- PyTorch DCP ``torch.distributed.checkpoint.save`` / ``load`` in one process, without a
  process group (where importable; ``load`` fills tensors allocated in the timing);
- floors: one plain file of the same tensor bytes, written without and with ``fsync``
  (file and directory, as ckptable's durable save), and read back with ``readinto``
  into fresh memory.

Which flush: ckptable durable (default) fsyncs; ``durable=False``, ``torch.save`` and
safetensors' ``save_file`` do not; DCP's ``FileSystemWriter`` fsyncs its files by default
(``sync_files=True``). The table says so per row, and each target compares like with like.

With ``--device cuda``, also the same state of ``--gpu-mib`` MiB (2 GiB) on the GPU (the
step tensors stay on the CPU, as Adam keeps them): saves (ckptable, ``torch.save``,
``save_file``, DCP; floor: a pinned device-to-host copy into a reused buffer, then a
plain write + fsync from it), restores onto the GPU (ckptable's default puts tensors back
on their device; ``load_file(device="cuda")``, ``torch.load(map_location="cuda")``, DCP
into CUDA tensors; floor: a plain read into pinned memory and a host-to-device copy) and
async saves: the caller's blocked time of ``ckptable.save_async`` (periodic: the pinned
memory of the previous save is reused) and of DCP's ``async_save`` against the pinned
device-to-host copy alone; their time to completion is reported too.

Targets, printed as PASS / FAIL per directory (a target passes only if both the ratio of
medians and the paired ratio, the median of per-repeat ratios, meet it):
CPU: save (``durable=False``, as ``save_file``) <= 1.1x ``save_file``; restore <= 1.1x
``load_file + copy``; ``mmap=True`` restore <= 2x ``load_file`` and <= 2x
``torch.load(mmap=True)``; peak extra memory of a restore <= 1.1x the state.
GPU: save <= DCP's save (both fsync); restore onto the GPU <= 1.1x
``load_file(device="cuda")``; ``save_async`` blocked <= 2x the pinned copy.

Method (as the other benchmarks): one untimed warm-up round (it also finds what is not
supported here: listed, not fatal), then ``--repeats`` timed rounds; each round runs the
families (ckptable, ckptable safetensors, torch, safetensors, DCP, plain) in an order
rotated from round to round, each family's saves then its restores of what it just saved
(so restores read from the page cache, as after a recent save), then deletes its files.
Within a family the ``durable=False`` save runs first, so that it follows what
``save_file``, ``torch.save`` and the plain write follow (another family's restore): on
the ext4 VM this was written on, a write of 1 GiB right after an fsync'd 1 GiB save
measured 2-8x slower than the same write after a restore, whatever wrote it.
Before each timed call, untimed: ``gc.collect()``, ``os.sync()``, a memory pre-warm (this
VM hands idle freed memory back to the host: see ``bench_durability.prewarm``) and
``malloc_trim``. Peak memory: the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the call, minus the resident set before it (it includes
the restored state; mapped file pages count once touched); on the GPU also
``torch.cuda.max_memory_allocated`` over the call. Every result is checked against the
original state (untimed).

Needs torch (and numpy, which ckptable's tensor records use); safetensors and DCP are
optional; ckptable is imported from this checkout's ``src``. Run from anywhere::

    python benchmarks/bench_torch.py --quick                      # a tiny run (seconds)
    python benchmarks/bench_torch.py --repeats 5                  # 1 GiB, temp dir + /dev/shm
    python benchmarks/bench_torch.py --device cuda --repeats 5    # + 2 GiB on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "ckptable" / "__init__.py").exists() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # this checkout's ckptable, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _memory

import torch  # noqa: E402
from _memory import PeakRss, release_freed_memory  # noqa: E402

import ckptable  # noqa: E402

MiB = 1 << 20


class BenchmarkError(RuntimeError):
    """A result differs from the original state, or a setup step failed."""


# ---------------------------------------------------------------------------- the state


class Learner(ckptable.Checkpointable):
    """A level whose whole state is the learner's dict (module + optimizer)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = state if state is not None else {}

    def get_state(self, components: Any = None, *, not_components: Any = None, **kw: Any) -> Any:
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = state

    def get_ctor_args_and_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {}


def learner_state(nbytes: int, device: str, seed: int = 0) -> dict[str, Any]:
    """About ``nbytes`` of tensors: 6/8 in six float32 matrices (two weights and their
    Adam moments), 2/8 in a bfloat16 embedding, plus step tensors and param groups."""
    cols = 1024
    rows = max(1, nbytes // 8 // 4 // cols)
    emb_rows = max(1, nbytes // 4 // 2 // cols)
    gen = torch.Generator().manual_seed(seed)

    def fp32() -> torch.Tensor:
        return torch.rand(rows, cols, generator=gen).to(device)

    module = {
        "encoder.weight": fp32(),
        "head.weight": fp32(),
        "embedding.weight": torch.rand(emb_rows, cols, generator=gen).to(torch.bfloat16).to(device),
    }
    optimizer_state = {
        name: {"step": torch.tensor(1000.0), "exp_avg": fp32(), "exp_avg_sq": fp32()}
        for name in ("encoder.weight", "head.weight")
    }
    groups = [
        {
            "lr": 1e-3,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "params": ["encoder.weight", "head.weight"],
        }
    ]
    return {"module": module, "optimizer": {"state": optimizer_state, "param_groups": groups}}


def flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of a nested dict."""
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for key, value in state.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: state}


def tensors_of(state: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flatten(state).items() if isinstance(v, torch.Tensor)}


def others_of(state: Any) -> dict[str, Any]:
    return {k: v for k, v in flatten(state).items() if not isinstance(v, torch.Tensor)}


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state).values())


def empty_like_state(state: Any) -> Any:
    """The same structure with fresh (uninitialised) tensors: DCP loads into these."""
    if isinstance(state, dict):
        return {k: empty_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [empty_like_state(v) for v in state]
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    return state


def check_state(actual: Any, expected: Any, *, device: str | None, what: str) -> None:
    """Every tensor of ``expected`` (by flattened name) equal in ``actual``, with its
    dtype, on ``device`` (None: the original's; "any": wherever); other leaves equal."""
    got = flatten(actual) if isinstance(actual, dict) else {}
    want = flatten(expected)
    if set(got) != set(want):
        raise BenchmarkError(f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}")
    for key, value in want.items():
        item = got[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(item, torch.Tensor) or item.dtype != value.dtype:
                raise BenchmarkError(f"{what}: {key} is not a {value.dtype} tensor")
            place = device or str(value.device)
            if place != "any" and str(item.device) != place:
                raise BenchmarkError(f"{what}: {key} on {item.device}, not {place}")
            if not torch.equal(item.to(value.device), value):
                raise BenchmarkError(f"{what}: {key} differs")
        elif item != value:
            raise BenchmarkError(f"{what}: {key} is {item!r}, not {value!r}")


# ------------------------------------------------------------------ untimed preparation


class Untimed:
    """What runs before each timed call: deletions, ``gc.collect()``, ``os.sync()``, the
    memory pre-warm and ``malloc_trim``."""

    def __init__(self, *, sync: bool, prewarm_bytes: int) -> None:
        self.sync = sync
        self.prewarm_bytes = prewarm_bytes

    def prepare(self) -> None:
        gc.collect()
        if self.sync:
            os.sync()
        if self.prewarm_bytes:
            buffer = torch.ones(self.prewarm_bytes // 8, dtype=torch.float64)
            del buffer
        release_freed_memory()


def cpu_gauge() -> float:
    """Seconds for a fixed pure-Python loop (a check that the machine's speed held)."""
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    return time.perf_counter() - start


def filesystem_of(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (from ``/proc/mounts``)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            inside = len(parts) >= 3 and os.path.realpath(path).startswith(parts[1])
            if inside and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


# ------------------------------------------------------------------------ the operations


@dataclasses.dataclass
class Op:
    """One timed operation: ``run(ctx)`` is the call; ``check(result, ctx)`` (untimed)
    checks its result; ``after(result, ctx)`` (untimed) waits for what it left running
    and returns seconds to add for the total (async saves)."""

    family: str
    kind: str  # "save" | "restore" | "async"
    label: str
    flushes: str
    run: Callable[[dict[str, Any]], Any]
    check: Callable[[Any, dict[str, Any]], None] | None = None
    after: Callable[[Any, dict[str, Any]], float] | None = None
    #: The label of the floor this operation is compared with in the table.
    floor: str = ""
    times: list[float] = dataclasses.field(default_factory=list)
    totals: list[float] = dataclasses.field(default_factory=list)
    memory: list[int] = dataclasses.field(default_factory=list)
    gpu_memory: list[int] = dataclasses.field(default_factory=list)
    unsupported: str | None = None


@dataclasses.dataclass
class Family:
    """Operations run back to back, saves then restores of what they saved; ``paths``
    names the files and directories its saves write (deleted after its restores)."""

    name: str
    ops: list[Op]
    paths: list[str]


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_plain(tensors: Sequence[torch.Tensor], path: str, *, fsync: bool) -> None:
    """The tensors' bytes back to back into one file (the floor of a save)."""
    with open(path, "wb") as f:
        for tensor in tensors:
            f.write(memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()))
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if fsync:
        fsync_path(os.path.dirname(path))


def read_plain(path: str, into: torch.Tensor | None = None) -> torch.Tensor:
    """The file read with ``readinto`` into fresh memory (or ``into``)."""
    size = os.path.getsize(path)
    buffer = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
    view = memoryview(buffer.numpy())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise BenchmarkError(f"{path}: short read")
            done += n
    return buffer


def check_plain(data: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        raw = tensor.detach().reshape(-1).view(torch.uint8).cpu()
        if not torch.equal(data[offset : offset + raw.numel()], raw):
            raise BenchmarkError("plain read: bytes differ")
        offset += raw.numel()


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def dcp_module() -> Any:
    """``torch.distributed.checkpoint``, or None where it cannot be imported."""
    try:
        import torch.distributed.checkpoint as dcp
    except Exception:
        return None
    return dcp


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """DCP warns that it runs without a process group (as it is meant to, here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


#: The floors (labels of the plain operations) of each kind of operation.
WRITE, WRITE_FSYNC, READ = "plain write (floor)", "plain write+fsync (floor)", "plain read (floor)"
GPU_WRITE = "pinned copy + write (floor)"
GPU_WRITE_FSYNC = "pinned copy + write+fsync (floor)"
GPU_READ = "plain read + host-to-device copy (floor)"
PINNED = "pinned device-to-host copy (floor)"


def cpu_families(state: dict[str, Any], where: str) -> list[Family]:
    """The CPU workload's operations, writing under ``where``."""
    tensors = list(tensors_of(state).values())
    flat = tensors_of(state)
    meta = {"others": json.dumps(others_of(state))}
    p = {name: os.path.join(where, name) for name in (
        "ck", "ck_nd", "ckst", "ckst_nd", "torch", "st", "dcp", "plain", "plain_fsync",
    )}  # fmt: skip

    def restore(path: str, **kwargs: Any) -> Any:
        learner = Learner()
        learner.restore_from_path(path, **kwargs)
        return learner.state

    def checker(what: str) -> Callable[[Any, dict[str, Any]], None]:
        return lambda result, _: check_state(result, state, device=None, what=what)

    def save(family: str, label: str, durable: bool, fn: Callable[[], Any]) -> Op:
        flushes, floor = ("fsync", WRITE_FSYNC) if durable else ("none", WRITE)
        return Op(family, "save", label, flushes, lambda _: fn(), floor=floor)

    def load(family: str, label: str, fn: Callable[[], Any], check: Any) -> Op:
        return Op(family, "restore", label, "", lambda _: fn(), check, floor=READ)

    ck, ckst = "ckptable", "ckptable safetensors"
    families = [
        Family(ck, [
            save(ck, "ckptable save durable=False", False,
                 lambda: Learner(state).save_to_path(p["ck_nd"], durable=False)),
            save(ck, "ckptable save (default: durable)", True,
                 lambda: Learner(state).save_to_path(p["ck"])),
            load(ck, "ckptable restore", lambda: restore(p["ck"]), checker(ck)),
            load(ck, "ckptable restore mmap=True", lambda: restore(p["ck"], mmap=True),
                 checker(ck)),
            load(ck, "ckptable restore mmap=True verify=False",
                 lambda: restore(p["ck"], mmap=True, verify=False), checker(ck)),
        ], [p["ck"], p["ck_nd"]]),
        Family(ckst, [
            save(ckst, "ckptable save format=safetensors durable=False", False,
                 lambda: Learner(state).save_to_path(
                     p["ckst_nd"], format="safetensors", durable=False)),
            save(ckst, "ckptable save format=safetensors", True,
                 lambda: Learner(state).save_to_path(p["ckst"], format="safetensors")),
            load(ckst, "ckptable restore (safetensors)", lambda: restore(p["ckst"]),
                 checker(ckst)),
            load(ckst, "ckptable restore mmap=True (safetensors)",
                 lambda: restore(p["ckst"], mmap=True), checker(ckst)),
            load(ckst, "ckptable restore mmap=True verify=False (safetensors)",
                 lambda: restore(p["ckst"], mmap=True, verify=False), checker(ckst)),
        ], [p["ckst"], p["ckst_nd"]]),
        Family("torch", [
            save("torch", "torch.save", False, lambda: torch.save(state, p["torch"])),
            load("torch", "torch.load(weights_only=True)",
                 lambda: torch.load(p["torch"], weights_only=True), checker("torch.load")),
            load("torch", "torch.load(mmap=True, weights_only=True)",
                 lambda: torch.load(p["torch"], mmap=True, weights_only=True),
                 checker("torch.load mmap")),
        ], [p["torch"]]),
        Family("plain", [
            save("plain", WRITE, False, lambda: write_plain(tensors, p["plain"], fsync=False)),
            save("plain", WRITE_FSYNC, True,
                 lambda: write_plain(tensors, p["plain_fsync"], fsync=True)),
            load("plain", READ, lambda: read_plain(p["plain"]),
                 lambda r, _: check_plain(r, tensors)),
        ], [p["plain"], p["plain_fsync"]]),
    ]  # fmt: skip
    if have("safetensors"):
        from safetensors.torch import load_file, save_file

        def check_flat(result: Any, _: dict[str, Any]) -> None:
            for key, tensor in flat.items():
                if not torch.equal(result[key], tensor):
                    raise BenchmarkError(f"safetensors: {key} differs")

        families.append(Family("safetensors", [
            save("safetensors", "safetensors save_file", False,
                 lambda: save_file(flat, p["st"], metadata=meta)),
            load("safetensors", "safetensors load_file (lazy)", lambda: load_file(p["st"]),
                 check_flat),
            load("safetensors", "safetensors load_file + copy",
                 lambda: {k: v.clone() for k, v in load_file(p["st"]).items()}, check_flat),
        ], [p["st"]]))  # fmt: skip
    dcp = dcp_module()
    if dcp is not None:

        def dcp_load() -> Any:
            target = empty_like_state(state)
            with quiet():
                dcp.load(target, checkpoint_id=p["dcp"])
            return target

        def dcp_save() -> Any:
            with quiet():
                return dcp.save(state, checkpoint_id=p["dcp"])

        dcp_save_op = save("DCP", "DCP save", True, dcp_save)
        dcp_save_op.flushes = "fsync (files)"
        families.append(Family("DCP", [
            dcp_save_op, load("DCP", "DCP load", dcp_load, checker("DCP load")),
        ], [p["dcp"]]))  # fmt: skip
    return families


def gpu_families(
    state: dict[str, Any], where: str, device: str, pinned: torch.Tensor
) -> list[Family]:
    """The GPU workload's operations (``pinned``: a reused host buffer for the floors)."""
    tensors = list(tensors_of(state).values())
    flat = tensors_of(state)
    p = {name: os.path.join(where, name) for name in (
        "ck", "ck_nd", "torch", "st", "dcp", "plain", "plain_fsync", "async", "dcp_async",
    )}  # fmt: skip
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def to_host() -> torch.Tensor:
        """The pinned device-to-host copy of every tensor into ``pinned`` (the floor)."""
        offset = 0
        for tensor in tensors:
            raw = tensor.detach().reshape(-1).view(torch.uint8)
            pinned[offset : offset + raw.numel()].copy_(raw, non_blocking=True)
            offset += raw.numel()
        sync()
        return pinned[:offset]

    def read_to_device() -> list[torch.Tensor]:
        data = read_plain(p["plain"], into=pinned)
        out, offset = [], 0
        for tensor in tensors:
            n = tensor.numel() * tensor.element_size()
            raw = data[offset : offset + n].to(tensor.device, non_blocking=True)
            out.append(raw.view(tensor.dtype).view(tensor.shape))
            offset += n
        sync()
        return out

    def check_read(result: Any, _: dict[str, Any]) -> None:
        for got, want in zip(result, tensors, strict=True):
            if not torch.equal(got, want):
                raise BenchmarkError("plain read to the device: differs")

    def restore(path: str, **kwargs: Any) -> Any:
        learner = Learner()
        learner.restore_from_path(path, **kwargs)
        sync()
        return learner.state

    def checker(what: str, device: str | None = None) -> Callable[[Any, dict[str, Any]], None]:
        return lambda result, _: check_state(result, state, device=device, what=what)

    def save(family: str, label: str, durable: bool, fn: Callable[[], Any]) -> Op:
        flushes, floor = ("fsync", GPU_WRITE_FSYNC) if durable else ("none", GPU_WRITE)
        return Op(family, "save", label, flushes, lambda _: fn(), floor=floor)

    def load(family: str, label: str, fn: Callable[[], Any], check: Any) -> Op:
        return Op(family, "restore", label, "", lambda _: fn(), check, floor=GPU_READ)

    def finish(future: Any, _: dict[str, Any]) -> float:
        start = time.perf_counter()
        result = getattr(future, "upload_completion", future).result(timeout=600)
        seconds = time.perf_counter() - start
        if isinstance(result, str):
            check_state(Learner.from_checkpoint(result).state, state, device=None,
                        what="ckptable save_async")  # fmt: skip
        return seconds

    ck = "ckptable"
    families = [
        Family(ck, [
            save(ck, "ckptable save durable=False", False,
                 lambda: Learner(state).save_to_path(p["ck_nd"], durable=False)),
            save(ck, "ckptable save (default: durable)", True,
                 lambda: Learner(state).save_to_path(p["ck"])),
            load(ck, "ckptable restore (onto the GPU)", lambda: restore(p["ck"]), checker(ck)),
            load(ck, "ckptable restore mmap=True (onto the GPU)",
                 lambda: restore(p["ck"], mmap=True), checker(ck)),
        ], [p["ck"], p["ck_nd"]]),
        Family("ckptable async", [
            Op("ckptable async", "async", "ckptable save_async (periodic)", "fsync",
               lambda _: ckptable.save_async(Learner(state), p["async"]), after=finish,
               floor=PINNED),
        ], [p["async"]]),
        Family("torch", [
            save("torch", "torch.save", False, lambda: torch.save(state, p["torch"])),
            load("torch", "torch.load(map_location=device)",
                 lambda: torch.load(p["torch"], map_location=device, weights_only=True),
                 checker("torch.load", "any")),
        ], [p["torch"]]),
        Family("plain", [
            Op("plain", "async", PINNED, "", lambda _: to_host()),
            save("plain", GPU_WRITE, False,
                 lambda: write_plain([to_host()], p["plain"], fsync=False)),
            save("plain", GPU_WRITE_FSYNC, True,
                 lambda: write_plain([to_host()], p["plain_fsync"], fsync=True)),
            load("plain", GPU_READ, read_to_device, check_read),
        ], [p["plain"], p["plain_fsync"]]),
    ]  # fmt: skip
    if have("safetensors"):
        from safetensors.torch import load_file, save_file

        def st_load() -> Any:
            result = load_file(p["st"], device=device)
            sync()
            return result

        def check_flat(result: Any, _: dict[str, Any]) -> None:
            for key, tensor in flat.items():
                if not torch.equal(result[key].to(tensor.device), tensor):
                    raise BenchmarkError(f"safetensors: {key} differs")

        families.append(Family("safetensors", [
            save("safetensors", "safetensors save_file", False,
                 lambda: save_file(flat, p["st"])),
            load("safetensors", "safetensors load_file(device=device)", st_load, check_flat),
        ], [p["st"]]))  # fmt: skip
    dcp = dcp_module()
    if dcp is not None:

        def dcp_load() -> Any:
            target = empty_like_state(state)
            with quiet():
                dcp.load(target, checkpoint_id=p["dcp"])
            sync()
            return target

        def dcp_save() -> Any:
            with quiet():
                return dcp.save(state, checkpoint_id=p["dcp"])

        def dcp_async(_: dict[str, Any]) -> Any:
            with quiet():
                return dcp.async_save(state, checkpoint_id=p["dcp_async"])

        dcp_save_op = save("DCP", "DCP save", True, dcp_save)
        dcp_save_op.flushes = "fsync (files)"
        families.append(Family("DCP", [
            dcp_save_op,
            load("DCP", "DCP load (into device tensors)", dcp_load, checker("DCP load")),
            Op("DCP", "async", "DCP async_save", "fsync (files)", dcp_async, after=finish,
               floor=PINNED),
        ], [p["dcp"], p["dcp_async"]]))  # fmt: skip
    return families


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Run:
    """The measurements of one workload in one directory."""

    workload: str
    where: str
    nbytes: int
    repeats: int
    ops: list[Op]


def run_workload(
    name: str,
    make: Callable[[str], list[Family]],
    where: str,
    nbytes: int,
    args: argparse.Namespace,
    gpu: bool,
) -> Run:
    prewarm = 2 * nbytes if args.prewarm_mib is None else args.prewarm_mib * MiB
    untimed = Untimed(sync=not args.no_sync, prewarm_bytes=prewarm)
    make(where)  # (imports what the operations need, before the freeze)
    # Everything alive now (modules, the state) is left out of the collections that
    # prepare each call: with torch and DCP imported, a full one took 0.25 s here.
    gc.collect()
    gc.freeze()
    peak = PeakRss()
    base = tempfile.mkdtemp(prefix="ckptable-bench-torch-", dir=where)
    ops: dict[str, Op] = {}
    try:
        for r in range(args.repeats + 1):  # round 0: the untimed warm-up
            families = make(os.path.join(base, f"r{r}"))
            os.makedirs(os.path.join(base, f"r{r}"))
            shift = r % len(families)
            for family in families[shift:] + families[:shift]:
                for op in family.ops:
                    kept = ops.setdefault(op.label, op)
                    if kept.unsupported:
                        continue
                    run_op(kept, op, r, untimed, peak, gpu)
                    print(
                        f"{name} {where} round {r} {op.label:<52} "
                        f"{kept.times[-1] * 1e3 if r and kept.times else float('nan'):9.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                for path in family.paths:
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.exists(path):
                        os.remove(path)
            shutil.rmtree(os.path.join(base, f"r{r}"), ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return Run(name, where, nbytes, args.repeats, list(ops.values()))


def run_op(kept: Op, op: Op, round_: int, untimed: Untimed, peak: PeakRss, gpu: bool) -> None:
    """One call of ``op`` (this round's closure), recorded in ``kept`` (round 0: untimed,
    and an exception there marks the operation unsupported)."""
    untimed.prepare()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated()
    context: dict[str, Any] = {}
    start_rss = peak.start()
    start = time.perf_counter()
    try:
        result = op.run(context)
    except Exception as exc:
        if round_ == 0:
            kept.unsupported = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            return
        raise
    seconds = time.perf_counter() - start
    extra = peak.extra(start_rss)
    gpu_extra = torch.cuda.max_memory_allocated() - gpu_start if gpu else None
    total = seconds + (op.after(result, context) if op.after else 0.0)
    if op.check is not None:
        op.check(result, context)
    del result
    if round_ == 0:
        return
    kept.times.append(seconds)
    kept.totals.append(total)
    if extra is not None:
        kept.memory.append(extra)
    if gpu_extra is not None:
        kept.gpu_memory.append(gpu_extra)


# ------------------------------------------------------------------------------ report


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_s(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_mib(nbytes: float) -> str:
    return "-" if nbytes != nbytes else f"{nbytes / MiB:,.0f} MiB"


def find(run: Run, label: str) -> Op | None:
    for op in run.ops:
        if op.label == label and op.times:
            return op
    return None


def ratio(a: Op | None, b: Op | None) -> tuple[float, float] | None:
    """(ratio of medians, median of per-repeat ratios) of ``a``'s times to ``b``'s."""
    if a is None or b is None or len(a.times) != len(b.times):
        return None
    paired = statistics.median(x / y for x, y in zip(a.times, b.times, strict=True))
    return median(a.times) / median(b.times), paired


def table(run: Run, gpu: bool) -> str:
    """The run's operations: median, range, throughput, ratio to its floor, memory."""
    gb = run.nbytes / 1e9
    lines = [
        f"### {run.workload}: {run.nbytes / MiB:,.0f} MiB of tensors in `{run.where}` "
        f"({filesystem_of(run.where)}), {run.repeats} interleaved repeats",
        "",
        "| op | implementation | fsync | median | min - max | GB/s | / floor "
        "(medians, paired) | peak extra RSS |" + (" peak extra GPU |" if gpu else ""),
        "|---|---|---|--:|--:|--:|--:|--:|" + ("--:|" if gpu else ""),
    ]
    for kind in ("save", "restore", "async"):
        for op in run.ops:
            if op.kind != kind or not op.times:
                continue
            versus = ratio(op, find(run, op.floor)) if op.floor else None
            rel = "-" if versus is None else f"{versus[0]:.2f}x, {versus[1]:.2f}x"
            seconds = median(op.times)
            total = f" (total {fmt_s(median(op.totals))})" if op.after is not None else ""
            row = (
                f"| {kind} | {op.label}{total} | {op.flushes} | {fmt_s(seconds)} | "
                f"{fmt_s(min(op.times))} - {fmt_s(max(op.times))} | {gb / seconds:.2f} | "
                f"{rel} | {fmt_mib(median(op.memory)) if op.memory else '-'} |"
            )
            if gpu:
                row += f" {fmt_mib(median(op.gpu_memory)) if op.gpu_memory else '-'} |"
            lines.append(row)
    skipped = [f"- not supported here: {op.label} ({op.unsupported})" for op in run.ops
               if op.unsupported]  # fmt: skip
    return "\n".join(lines + (["", *skipped] if skipped else []))


@dataclasses.dataclass
class Target:
    name: str
    numerator: str
    denominator: str
    limit: float


CPU_TARGETS = [
    Target("save (durable=False) <= 1.1x safetensors save_file",
           "ckptable save durable=False", "safetensors save_file", 1.1),
    Target("restore <= 1.1x safetensors load_file + copy",
           "ckptable restore", "safetensors load_file + copy", 1.1),
    Target("mmap restore <= 2x safetensors load_file",
           "ckptable restore mmap=True", "safetensors load_file (lazy)", 2.0),
    Target("mmap restore <= 2x torch.load(mmap=True)",
           "ckptable restore mmap=True", "torch.load(mmap=True, weights_only=True)", 2.0),
    # The lazy loaders read nothing; with verify=True (the default) ckptable reads every
    # byte to check it first: these two say what the mapping itself costs.
    Target("(info) mmap restore verify=False <= 2x safetensors load_file",
           "ckptable restore mmap=True verify=False", "safetensors load_file (lazy)", 2.0),
    Target("(info) mmap restore verify=False <= 2x torch.load(mmap=True)",
           "ckptable restore mmap=True verify=False",
           "torch.load(mmap=True, weights_only=True)", 2.0),
    Target("(info) safetensors format: mmap restore <= 2x safetensors load_file",
           "ckptable restore mmap=True (safetensors)", "safetensors load_file (lazy)", 2.0),
]  # fmt: skip
GPU_TARGETS = [
    Target("save (durable) <= DCP save (fsyncs files)",
           "ckptable save (default: durable)", "DCP save", 1.0),
    Target("restore onto the GPU <= 1.1x safetensors load_file(device=cuda)",
           "ckptable restore (onto the GPU)", "safetensors load_file(device=device)", 1.1),
    Target("save_async blocked <= 2x pinned device-to-host copy",
           "ckptable save_async (periodic)", PINNED, 2.0),
]  # fmt: skip


def targets(run: Run, gpu: bool) -> list[str]:
    rows = []
    for target in GPU_TARGETS if gpu else CPU_TARGETS:
        found = ratio(find(run, target.numerator), find(run, target.denominator))
        if found is None:
            rows.append(f"| {target.name} | <= {target.limit}x | - | - | not measured |")
            continue
        ok = found[0] <= target.limit and found[1] <= target.limit
        rows.append(
            f"| {target.name} | <= {target.limit}x | {found[0]:.2f}x | {found[1]:.2f}x | "
            f"{'PASS' if ok else 'FAIL'} |"
        )
    if not gpu:
        restore = find(run, "ckptable restore")
        if restore is not None and restore.memory:
            share = median(restore.memory) / run.nbytes
            worst = max(restore.memory) / run.nbytes
            rows.append(
                f"| peak extra memory of a restore <= 1.1x the state | <= 1.1x | "
                f"{share:.2f}x | (max {worst:.2f}x) | {'PASS' if share <= 1.1 else 'FAIL'} |"
            )
    return [
        f"Targets, {run.workload} in `{run.where}`:",
        "",
        "| target | limit | ratio of medians | paired ratio | result |",
        "|---|---|--:|--:|---|",
        *rows,
    ]


# ------------------------------------------------------------------------------ main


def default_dirs() -> list[str]:
    dirs = [tempfile.gettempdir()]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        dirs.append("/dev/shm")
    return dirs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--dir",
        action="append",
        dest="dirs",
        default=None,
        help="where to save (repeatable; default: the temp dir and /dev/shm)",
    )
    parser.add_argument("--mib", type=int, default=1024, help="MiB of CPU tensors")
    parser.add_argument("--gpu-mib", type=int, default=2048, help="MiB of GPU tensors")
    parser.add_argument(
        "--device", default="cpu", help="cpu (the CPU workload) or cuda / cuda:N (also the GPU one)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument(
        "--prewarm-mib",
        type=int,
        default=None,
        help="memory touched before each timed call (default: 2x the state)",
    )
    parser.add_argument("--no-sync", action="store_true", help="no os.sync() before calls")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU workload")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run: 16 MiB (GPU: 32 MiB), 2 repeats"
    )
    # Runs the GPU workload's code on the CPU (to check the script without a GPU).
    parser.add_argument("--device-workload-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.mib, args.gpu_mib, args.repeats = 16, 32, 2
    args.dirs = args.dirs or default_dirs()
    return args


def header(args: argparse.Namespace) -> list[str]:
    cuda = torch.cuda.is_available()
    versions = [f"torch {torch.__version__}", f"ckptable {ckptable.__version__}"]
    if have("safetensors"):
        import safetensors

        versions.append(f"safetensors {safetensors.__version__}")
    versions.append(f"DCP {'available' if dcp_module() is not None else 'not importable'}")
    return [
        "## Torch states: ckptable vs torch.save, safetensors, DCP",
        "",
        f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `python benchmarks/bench_torch.py {' '.join(sys.argv[1:])}`",
        f"- Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name(0)}" if cuda else ", no GPU"),
        f"- Versions: {', '.join(versions)} (ckptable from `{Path(ckptable.__file__).parent}`)",
        "- fsync: `fsync` = files and directories (ckptable's durable default, plain+fsync); "
        "`fsync (files)` = DCP's `sync_files=True`; `none` = page cache only.",
        "- Restores read files just written (page cache). Peak extra RSS includes the "
        "restored state (mapped file pages count once touched).",
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gauge_before = cpu_gauge()
    runs: list[tuple[Run, bool]] = []
    if not args.skip_cpu:
        state = learner_state(args.mib * MiB, "cpu")
        nbytes = state_bytes(state)
        for where in args.dirs:
            runs.append((
                run_workload("CPU", lambda d, s=state: cpu_families(s, d), where, nbytes,
                             args, gpu=False),
                False,
            ))  # fmt: skip
        del state
    device = "cpu" if args.device_workload_on_cpu else args.device
    if args.device != "cpu" or args.device_workload_on_cpu:
        if device != "cpu" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
        state = learner_state(args.gpu_mib * MiB, device)
        nbytes = state_bytes(state)
        pinned = torch.empty(nbytes + MiB, dtype=torch.uint8, pin_memory=device != "cpu")
        for where in args.dirs:
            runs.append((
                run_workload(f"GPU ({device})",
                             lambda d, s=state: gpu_families(s, d, device, pinned),
                             where, nbytes, args, gpu=device != "cpu"),
                True,
            ))  # fmt: skip
        del state, pinned
        ckptable.release_snapshot_memory()
    gauge_after = cpu_gauge()
    lines = header(args)
    for run, gpu in runs:
        lines += [table(run, gpu), "", *targets(run, gpu), ""]
    lines.append(
        f"CPU gauge (2M-iteration Python loop): {gauge_before * 1e3:.0f} ms before, "
        f"{gauge_after * 1e3:.0f} ms after."
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    # Run as the module ``bench_torch``, so that cloudpickle pickles ``Learner`` by
    # reference (as it would a user's class), not by value as a class of ``__main__``.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_torch

    sys.exit(bench_torch.main())
