"""Plain concurrent transfers on the S3 test server, client library against client library.

What: ``--objects`` (4) objects of ``--mib`` (64) MiB of float32 arrays, each uploaded and
then downloaded whole, all at once (a thread per object), through each client library's
own calls, the ones ``bench_storage.py``'s plain baselines use:

- pyarrow: ``S3FileSystem.open_output_stream(...).write(array)``, and
  ``open_input_stream(...).read(size)`` (a ``HEAD``, then a ``GET``);
- s3fs: ``pipe_file(key, array.tobytes())`` (botocore takes ``bytes``), and
  ``cat_file(key, start=0, end=size)``;
- obstore: ``obstore.put(store, key, memoryview(array))``, and
  ``obstore.get(store, key).bytes()`` (its ``Bytes``, not copied).

Why: issue 15 asks whether a client library better suited to concurrent object I/O
(obstore, say) would serve ckptable better than the adapters it has (pyarrow's
filesystems and fsspec's). This is the floor each library sets, measured side by side.

Method: the moto server of ``bench_storage.py`` behind its latency proxy (``--rtt-ms``,
default 20); one untimed warm-up round, then ``--repeats`` rounds, the clients in an
order rotated from round to round; before each timed call, untimed, ``gc.collect()``,
the memory pre-warm and freed memory handed back (as ``bench_storage.py``). Every
download is checked against the arrays. Reported: medians, the ratio of medians to
pyarrow and the paired ratio (median of the per-round ratios).

Run from the repository root (``pip install obstore``; a client that is not installed
is left out, and said so)::

    python benchmarks/bench_s3_clients.py
    python benchmarks/bench_s3_clients.py --repeats 9 --rtt-ms 0
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_storage

CLIENTS = ("pyarrow", "s3fs", "obstore")


def clients(view: Any, size: int) -> dict[str, tuple[Callable[..., None], Callable[..., Any]]]:
    """Each installed client's ``put(key, array)`` and ``get(key)`` on ``view``."""
    bucket = bench_storage.BUCKET
    out: dict[str, tuple[Callable[..., None], Callable[..., Any]]] = {}
    pa = view.pyarrow_filesystem()

    def pa_put(key: str, array: np.ndarray) -> None:
        with pa.open_output_stream(f"{bucket}/{key}") as stream:
            stream.write(array)

    def pa_get(key: str) -> Any:
        with pa.open_input_stream(f"{bucket}/{key}") as stream:
            return stream.read(size)

    out["pyarrow"] = (pa_put, pa_get)
    if importlib.util.find_spec("s3fs") is not None:
        fs = view.s3fs_filesystem(
            config_kwargs={"max_pool_connections": 32}, skip_instance_cache=True
        )
        out["s3fs"] = (
            lambda key, array: fs.pipe_file(f"{bucket}/{key}", array.tobytes()),
            lambda key: fs.cat_file(f"{bucket}/{key}", start=0, end=size),
        )
    if importlib.util.find_spec("obstore") is not None:
        import obstore

        store = view.obstore_store(bucket)
        out["obstore"] = (
            lambda key, array: obstore.put(store, key, memoryview(array).cast("B")),
            lambda key: obstore.get(store, key).bytes(),
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64, help="MiB per object")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    args = parser.parse_args(argv)

    arrays = [
        np.random.default_rng(i).random((args.mib << 20) // 4, dtype=np.float32)
        for i in range(args.objects)
    ]
    size = arrays[0].nbytes
    times: dict[tuple[str, str], list[float]] = {}
    pool = ThreadPoolExecutor(args.objects)
    prefix = f"clients-{os.getpid()}"

    def timed(run: Callable[[], Any]) -> tuple[float, Any]:
        gc.collect()
        bench_storage.prewarm(2 * args.objects * size)
        bench_storage.release_memory()
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result

    with (
        bench_storage.s3_server() as server,
        bench_storage.s3_view(server, args.rtt_ms) as view,
    ):
        calls = clients(view, size)
        for name in CLIENTS:
            if name not in calls:
                print(f"{name}: not installed, left out", file=sys.stderr)
        names = [name for name in CLIENTS if name in calls]
        for r in range(args.repeats + 1):
            order = names[r % len(names) :] + names[: r % len(names)]
            for op in ("put", "get"):
                for name in order:
                    put, get = calls[name]
                    keys = [f"{prefix}/{name}/r{r}/object{i}" for i in range(args.objects)]
                    if op == "put":
                        seconds, _ = timed(lambda: list(pool.map(put, keys, arrays)))  # noqa: B023
                    else:
                        seconds, got = timed(lambda: list(pool.map(get, keys)))  # noqa: B023
                        for data, array in zip(got, arrays, strict=True):
                            if memoryview(data).cast("B") != memoryview(array).cast("B"):
                                raise SystemExit(f"{name}: a download differs from its upload")
                        del got
                    if r:
                        times.setdefault((op, name), []).append(seconds)
            print(f"[round {r}/{args.repeats}]", file=sys.stderr, flush=True)

    latency = f"{args.rtt_ms:g} ms RTT" if args.rtt_ms else "no added latency"
    print(
        f"\n{args.objects} x {args.mib} MiB, all at once, S3 test server ({latency}), "
        f"{args.repeats} repeats\n"
    )
    print("| operation | client | median | / pyarrow (medians) | / pyarrow (paired) |")
    print("|---|---|--:|--:|--:|")
    for op in ("put", "get"):
        base = times[(op, "pyarrow")]
        for name in names:
            samples = times[(op, name)]
            paired = statistics.median(a / b for a, b in zip(samples, base, strict=True))
            print(
                f"| {op} | {name} | {statistics.median(samples) * 1000:.0f} ms | "
                f"{statistics.median(samples) / statistics.median(base):.2f}x | {paired:.2f}x |"
            )


if __name__ == "__main__":
    main()
