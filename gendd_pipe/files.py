"""Reading and writing the small files stages leave next to their outputs: JSON, YAML, on any fsspec path.

Writes go to a temporary file that is then renamed where the filesystem can
rename (local paths), so a killed stage never leaves half a metrics file. URLs
in what is written pass `public_url` first: credentials in a URL
(``https://user:password@host/...``, ``?X-Amz-Signature=...``) never reach a
record, a manifest or a log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
import yaml


SECRET = re.compile(r"sig|signature|token|key|credential|secret|password|auth", re.IGNORECASE)
REDACTED = "REDACTED"


def public_url(url: str) -> str:
    """``url`` as it may be recorded or logged: no ``user:password@``, secret-looking query values redacted."""
    if "://" not in url:
        return url
    return "::".join(_public(part) for part in url.split("::"))  # fsspec chains: simplecache::s3://...


def _public(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = [(k, REDACTED if SECRET.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="/"), parts.fragment))


def redact(data):
    """Every URL in a JSON-like tree through `public_url`."""
    if isinstance(data, str):
        return public_url(data)
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    return data


def write_text(path: str, text: str) -> None:
    """Write ``text`` whole or not at all: a local file through a temporary file and a rename, an object in one
    PUT."""
    if "://" in path:  # object stores: one PUT is atomic
        with fsspec.open(path, "w") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(redact(data), indent=2, default=str) + "\n")


def write_yaml(path: str, data) -> None:
    write_text(path, dump_yaml(redact(data)))


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a value written twice is written out twice, never as &id001
        return True


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def file_sha256(url: str) -> str:
    """The sha256 (hex) of a file's bytes, local or at an fsspec URL, read in blocks."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_yaml(path: str) -> dict:
    with fsspec.open(path, "r") as f:
        return yaml.safe_load(f) or {}
