"""Leases: which writer owns a feature shard, or the store's root, while it writes it.

Two extractions started on one store must never write the same shard at once
(one's ``overwrite`` would delete what the other is writing). Before it writes
a shard the driver takes the shard's lease: a small JSON object
``leases/<name>.<generation>`` beside the store's groups, made with an
exclusive create (fsspec's mode ``xb``: ``O_EXCL`` on a filesystem, a
conditional put, ``If-None-Match: *``, on S3-protocol object stores), so that
of two writers creating the same generation exactly one succeeds. The holder
renews its leases every ``ttl / 4`` on a thread; a lease whose expiry has
passed, or whose process on this host is gone, belongs to a writer that died,
and is taken over by creating the next generation, which again only one writer
can. A lease is deleted once its shard
is complete. Readers never look at leases: ``complete`` stays the commit.

The driver holds the leases, not the Dask tasks, so a task retried on another
worker after its first worker was lost writes under the same lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec
import psutil
import zarr

from gendd_pipe.storage import storage_errors
from gendd_pipe.store.writer import RESUME, is_complete

log = logging.getLogger(__name__)

LEASES = "leases"
TTL_S = 300.0  # a lease not renewed for this long is a dead writer's
_STARTED = psutil.Process().create_time()  # with the pid, names this process even after its pid is reused


def _live(lease: dict | None) -> bool:
    """Whether a lease's writer may still be writing: not expired, and on this host its process still there
    (a writer killed here is known dead at once, one elsewhere once its lease expires)."""
    if lease is None or lease["expires"] <= time.time():
        return False
    if lease.get("host") != socket.gethostname() or "pid" not in lease:
        return True
    try:
        return psutil.Process(lease["pid"]).create_time() == lease.get("started")
    except psutil.NoSuchProcess:
        return False


class Leases:
    """The leases one writer (a run of ``extract``) holds on a store.

    Args:
        store: The store's path or URL.
        storage_options: fsspec options of the store's filesystem.
        ttl: Seconds a lease lives without renewal.
    """

    def __init__(self, store: str, storage_options: dict | None = None, ttl: float = TTL_S):
        self.fs, root = fsspec.core.url_to_fs(store, **(storage_options or {}))
        self.dir, self.ttl = f"{root.rstrip('/')}/{LEASES}", ttl
        self.owner = uuid.uuid4().hex
        self.held: dict[str, int] = {}  # name -> generation
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "Leases":
        self._renewer = threading.Thread(target=self._renew_every, name="lease-renewal", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
        for name in list(self.held):
            try:
                self.release(name)
            except OSError as exc:  # the store turned read-only or full: the lease expires by itself
                log.debug("lease %s: not released (%s)", name, exc)

    def take(self, name: str) -> bool:
        """Take ``name``'s lease: True when it is now this writer's (free, expired, or held already), False
        while another live writer holds it."""
        with self._lock:
            if name in self.held:
                return True
            generations = self._generations(name)
            if generations:
                latest = generations[-1]
                lease = self._read(name, latest)
                if _live(lease):
                    return False
                if lease is not None:
                    log.info("lease %s: its writer (%s, pid %s) is gone; taking it over", name,
                             lease.get("host", "?"), lease.get("pid", "?"))
            generation = generations[-1] + 1 if generations else 0
            try:
                self._write(name, generation, "xb")
            except FileExistsError:  # another writer created this generation first
                return False
            self.held[name] = generation
            return True

    def release(self, name: str) -> None:
        """Give up ``name``'s lease: its generations up to this writer's are deleted."""
        with self._lock:
            generation = self.held.pop(name, None)
            if generation is None:
                return
            for g in self._generations(name):
                if g <= generation:
                    try:
                        self.fs.rm(self._path(name, g))
                    except FileNotFoundError:
                        pass

    def holder(self, name: str) -> dict | None:
        """The live lease of ``name`` (owner, host, pid, expires), or None when it has none."""
        generations = self._generations(name)
        lease = self._read(name, generations[-1]) if generations else None
        return lease if _live(lease) else None

    def _renew_every(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._lock:
                for name, generation in self.held.items():
                    try:
                        self._write(name, generation, "wb")
                    except OSError as exc:  # the writes of the shard itself report it
                        log.debug("lease %s: not renewed (%s)", name, exc)

    def _path(self, name: str, generation: int) -> str:
        return f"{self.dir}/{name}.{generation}"

    def _generations(self, name: str) -> list[int]:
        self.fs.invalidate_cache(self.dir)
        try:
            entries = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        prefix = f"{name}."
        found = (os.path.basename(e.rstrip("/")) for e in entries)
        return sorted(int(f[len(prefix):]) for f in found if f.startswith(prefix) and f[len(prefix):].isdigit())

    def _read(self, name: str, generation: int) -> dict | None:
        """A lease as written, one caught between its create and its write as live from its file's time,
        or None once released."""
        path = self._path(name, generation)
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            try:
                return {"expires": self.fs.modified(path).timestamp() + self.ttl}
            except FileNotFoundError:
                return None

    def _write(self, name: str, generation: int, mode: str) -> None:
        lease = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "started": _STARTED,
                 "expires": time.time() + self.ttl}
        if mode == "xb":  # a first create; a renewal rewrites a file that is there
            self.fs.makedirs(self.dir, exist_ok=True)
        with self.fs.open(self._path(name, generation), mode) as f:
            f.write(json.dumps(lease).encode())


class Claims:
    """The shards one extraction still has to see complete, and which of them it writes itself.

    A shard is this writer's to write once `claimed` has taken its lease and found it still incomplete;
    `finish` gives the lease back once it is written. Shards another live writer holds are left to it, and
    `settle` notices them complete (or takes them on a later pass, once their writer's lease has expired).

    Args:
        store: The store's path or URL.
        root: Its root group.
        leases: This writer's leases on it.
        names: The shards to see complete, in the order they are claimed.
        views: The views each of them must hold to count as complete (a store growing by views); None: any.
    """

    def __init__(self, store: str, root: zarr.Group, leases: Leases, names: list[str], views: int | None = None):
        self.store, self.root, self.leases, self.views = store, root, leases, views
        self.todo, self.written = list(names), set()

    def claimed(self):
        """The shards of `todo` this writer may write now, one at a time as they are asked for (so that a writer
        beside this one takes its share meanwhile): its lease taken, and not completed by another writer."""
        for name in list(self.todo):
            with storage_errors(self.store, f"write the lease of feature shard {name}", hint=RESUME):
                if not self.leases.take(name):
                    continue
            if is_complete(self.root, name, self.views):
                self._release(name)
                continue
            yield name

    def finish(self, name: str) -> None:
        """``name`` is written: its lease goes back."""
        self._release(name)
        self.written.add(name)

    def settle(self) -> list[str]:
        """Drop the complete shards from `todo` (this writer's, and any another writer completed); returns them."""
        complete = [name for name in self.todo if is_complete(self.root, name, self.views)]
        self.todo = [name for name in self.todo if name not in complete]
        return complete

    def holder(self) -> dict:
        """The live lease of the first shard still to do (host, pid), or an empty dict."""
        return (self.leases.holder(self.todo[0]) if self.todo else None) or {}

    def _release(self, name: str) -> None:
        with storage_errors(self.store, f"write the lease of feature shard {name}", hint=RESUME):
            self.leases.release(name)
