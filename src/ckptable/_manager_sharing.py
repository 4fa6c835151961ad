"""Several processes in one directory: the lock a save holds from its step check to the end
of its retention.

On a local disk a save holds an advisory ``flock`` on the directory itself (no lock
file: nothing to be mistaken for a checkpoint), so saves from several processes (or
managers) take turns, each reads the others' checkpoints (``ckptable._manager_listing``)
under the lock, and none deletes what another just wrote. ``reload`` only tries the
lock: it finishes deletions that a killed process left only while no save is running.
Object stores have no locks: the manager reads the directory again right before the
step check and before retention, which narrows the window but cannot close it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from ckptable._storage import LocalStorage, Storage

__all__ = ["DirectoryLock"]

logger = logging.getLogger("ckptable")


class DirectoryLock:
    """The advisory lock on a manager's directory: exclusive between processes (and
    between managers), shared by the threads of one manager (its async saves run side by
    side, as ``max_in_flight`` allows).

    It is a ``flock`` on the directory itself, released when the last holder of the
    manager lets go or the process dies. Storages without locks (object stores; a local
    filesystem that refuses ``flock``, with a warning) are held without one.
    """

    def __init__(self, storage: Storage, root: str, shown: str) -> None:
        # A symlinked local directory is locked where it points (the flock opens no links).
        self._root = os.path.realpath(root) if isinstance(storage, LocalStorage) else root
        self._storage, self._shown = storage, shown
        self._changed = threading.Condition(threading.Lock())
        self._holders = 0
        self._acquiring = False
        self._handle: Any = None
        self._warned = False

    @contextlib.contextmanager
    def hold(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock in the body; yield False only when not ``blocking`` and another
        process (or manager) holds it, or this manager is still waiting for it."""
        held = self._acquire(blocking)
        try:
            yield held
        finally:
            if held:
                self._release()

    def _acquire(self, blocking: bool) -> bool:
        with self._changed:
            while self._acquiring:  # one thread waits for the flock; the others join it
                if not blocking:
                    return False
                self._changed.wait()
            if self._holders:
                self._holders += 1
                return True
            self._acquiring = True
        handle, held = None, True
        try:
            handle = self._storage.lock_directory(self._root, blocking=blocking)
        except BlockingIOError:
            held = False
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Cannot lock %s (%s): saves from several processes into it are not "
                    "coordinated.",
                    self._shown,
                    exc,
                )
        except BaseException:
            held = False
            raise
        finally:
            with self._changed:
                self._acquiring = False
                if held:
                    self._handle, self._holders = handle, 1
                self._changed.notify_all()
        return held

    def _release(self) -> None:
        with self._changed:
            self._holders -= 1
            if self._holders == 0:
                handle, self._handle = self._handle, None
                self._storage.unlock(handle)
