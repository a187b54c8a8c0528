"""Stores, shards and weights on any fsspec filesystem: where their options come from, and what their errors mean.

A path is local; a URL (``s3://bucket/store.zarr``, ``gs://...``, ``https://...``) goes through fsspec and
the filesystem package of its scheme (``s3fs`` for ``s3://``: ``pip install 'gendd-pipe[s3]'``). Endpoint and
credentials come from where the filesystem package looks for them (for S3: ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` ...) or from ``--storage-option KEY=VALUE``, which `configure` puts in
fsspec's configuration for the schemes a command uses (``fsspec.config.conf`` and ``FSSPEC_<SCHEME>`` in the
environment, so Dask workers and DataLoader workers started by this process see them too). They never reach
a config a stage writes, a manifest or a log line.

`storage_errors` turns what these filesystems raise for a missing bucket, refused credentials, an endpoint
that does not answer or a scheme whose package is not installed into one line naming the URL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager

import fsspec
import yaml

from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url

SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_CREDENTIALS = {"s3": "AWS_PROFILE, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-option key=... "
                      "--storage-option secret=...",
                "gs": "GOOGLE_APPLICATION_CREDENTIALS, or --storage-option token=..."}
_MISSING_BUCKET = re.compile(r"bucket does not exist|NoSuchBucket", re.IGNORECASE)


def scheme(url: str) -> str | None:
    """The fsspec protocol of a URL (the last of a chain like ``simplecache::s3://``), None for a local path."""
    last = url.rsplit("::", 1)[-1]
    return last.split("://", 1)[0].lower() if "://" in last and not last.startswith("file://") else None


def urls_in(data) -> list[str]:
    """Every URL in a JSON-like tree (a resolved config)."""
    if isinstance(data, str):
        return [data] if scheme(data) else []
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (list, tuple)):
        return [url for item in data for url in urls_in(item)]
    return []


def parse_options(pairs: Iterable[str]) -> dict:
    """``KEY=VALUE`` strings -> fsspec options; values are read as YAML scalars (``true``, ``5``, text)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise GenddError(f"--storage-option {pair.split('=')[0]!r}: expected KEY=VALUE, as endpoint_url=https://host")
        parsed = yaml.safe_load(value) if value else ""
        options[key] = parsed if isinstance(parsed, (bool, int, float)) else value
    return options


def configure(options: dict, urls: Iterable[str]) -> None:
    """Apply ``options`` to every filesystem of the schemes of ``urls``, here and in processes started from here."""
    schemes = sorted({s for s in map(scheme, urls) if s})
    if options and not schemes:
        raise GenddError(f"--storage-option {next(iter(options))}: this command names no URL for it to apply to "
                         "(a store, shards or weights on s3://, gs:// ...)")
    for name in schemes:
        merged = {**fsspec.config.conf.get(name, {}), **options}
        fsspec.config.conf[name] = merged
        os.environ[f"FSSPEC_{name.upper()}"] = json.dumps(merged)


@contextmanager
def storage_errors(url: str, what: str = "open", hint: str | None = None):
    """Errors of the filesystem behind ``url`` as one `GenddError` naming it (``what``: what was being done).

    With a ``hint`` (what to do, for a write: what the failure left), any other `OSError` (a disk full,
    read-only or gone) is one line too, ending in the hint; without one, errors this does not know pass
    unchanged.
    """
    try:
        yield
    except GenddError:
        raise
    except Exception as exc:
        explained = explain(exc, url, what)
        if explained is not None:
            raise explained from exc
        if hint is None or not isinstance(exc, OSError):
            raise
        raise GenddError(f"{public_url(url)}: cannot {what} ({exc.strerror or exc}); {hint}") from exc


def explain(exc: BaseException, url: str, what: str = "open") -> GenddError | None:
    """The one-line error of a storage failure at ``url``, or None when ``exc`` is not one this knows."""
    proto, shown = scheme(url) or "file", public_url(url)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ImportError) and proto in SCHEME_PACKAGES:
        extra = " (pip install 'gendd-pipe[s3]')" if SCHEME_PACKAGES[proto] == "s3fs" else ""
        return GenddError(f"{shown}: {proto}:// needs the {SCHEME_PACKAGES[proto]} package, which is not "
                          f"installed{extra}")
    if isinstance(exc, ValueError) and message.startswith("Protocol not known"):
        return GenddError(f"{shown}: no fsspec filesystem handles {proto}://")
    if proto == "file":
        return None  # a local path: the OSError says it (see errors.user_message)
    if isinstance(exc, FileNotFoundError) and _MISSING_BUCKET.search(message):
        bucket = url.rsplit("::", 1)[-1].split("://", 1)[1].split("/", 1)[0]
        return GenddError(f"{shown}: bucket {bucket} does not exist (or is not visible with these credentials); "
                          "create it or correct the URL")
    if isinstance(exc, PermissionError):
        how = _CREDENTIALS.get({"s3a": "s3", "gcs": "gs"}.get(proto, proto), "the filesystem's credentials, or --storage-option")
        return GenddError(f"{shown}: cannot {what}: access denied ({message[:120]}); check the credentials "
                          f"({how})")
    if _unreachable(exc):
        return GenddError(f"{shown}: cannot {what}: the object store's endpoint does not answer "
                          f"({type(exc).__name__}); check AWS_ENDPOINT_URL or --storage-option endpoint_url=...")
    return None


def nothing_at(url: str, expected: str) -> GenddError:
    """The error for a URL where ``expected`` (a store, a shard) is not: its bucket's absence where that is why."""
    if scheme(url):
        fs, path = fsspec.core.url_to_fs(url)
        bucket = path.split("/", 1)[0]
        if bucket and not fs.exists(bucket):
            return explain(FileNotFoundError("bucket does not exist"), url)
    return GenddError(f"{public_url(url)}: no {expected} here; check the path or URL")


def _unreachable(exc: BaseException) -> bool:
    """A connection that could not be made: botocore's, aiohttp's, or the system's."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "ConnectionRefusedError", "ServerTimeoutError"})
