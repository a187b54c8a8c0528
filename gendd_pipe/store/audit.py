"""Looking into a store: `summarize` (what `gendd-pipe info` prints) and `verify`.

`verify` checks that every listed shard is complete and self-consistent (every
array present, readable and matching the checksum written with it, array
lengths, view and feature widths, unique keys, finite values), and optionally
re-runs N random (sample, view) pairs through the teacher named in the
manifest, from the source shards, and reports the cosine similarity of the
recomputed features to the stored ones.
"""

from __future__ import annotations

import numpy as np
import torch

from gendd_pipe.data.render import normalize_pixels
from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader
from gendd_pipe.errors import GenddError
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.runtime import RuntimeConfig
from gendd_pipe.files import public_url
from gendd_pipe.store.format import COMPUTE_BEFORE_PRECISION, VIEW_ARRAYS
from gendd_pipe.store.reader import FeatureStore

PAYLOAD = ("features", "logits", "topk_values")  # arrays compared against raw fp32


def summarize(store: FeatureStore) -> dict:
    """Manifest summary plus sizes: bytes on disk and compression against raw fp32."""
    m = store.manifest
    stored = raw = payload_stored = samples = 0
    for name in store.shard_names:
        group = store.shard(name)
        samples += int(group.attrs["count"])
        for key, array in group.arrays():
            size = array.nbytes_stored()
            stored += size
            if key in PAYLOAD:
                raw += array.size * 4
                payload_stored += size
            elif key == "feature_scales":  # part of the int8 features
                payload_stored += size
    views = samples * m["views"]["count"]
    return {
        "store": store.url,
        "teacher": m["teacher"],
        "preprocessing": m["preprocessing"],
        "views": m["views"],
        "logits": m["logits"],
        "compute": m.get("compute", COMPUTE_BEFORE_PRECISION),
        "storage": {"features_dtype": "float16", **m.get("storage", {})},
        **({"int8_cosine": m["int8_cosine"]} if "int8_cosine" in m else {}),
        "shards": len(store.shard_names),
        "samples": samples,
        "skipped": len(m["skipped"]),
        "bytes_stored": stored,
        "bytes_per_view": stored / views if views else 0.0,
        "raw_fp32_bytes": raw,
        "compression_ratio": raw / payload_stored if payload_stored else 0.0,
        "tool_version": m["tool_version"],
    }


def check_shard(store: FeatureStore, name: str) -> list[str]:
    """Problems found in one shard (empty if consistent)."""
    m = store.manifest
    data, problems = store.check_arrays(name)  # missing, unreadable, short, or not matching its checksum
    widths = {"views": 5, "features": m["teacher"]["num_features"]}
    if m["logits"]["mode"] == "full":
        widths["logits"] = m["teacher"]["num_classes"]
    elif m["logits"]["mode"] == "topk":
        widths["topk_values"] = widths["topk_indices"] = m["logits"]["k"]
    for key in widths:
        if key in data and data[key].shape[1:] != (m["views"]["count"], widths[key]):
            problems.append(f"shard {name}: {key} has shape {data[key].shape}, expected (n, {m['views']['count']}, {widths[key]})")
    if "keys" in data and len(set(data["keys"].tolist())) != len(data["keys"]):
        problems.append(f"shard {name}: duplicate keys")
    for key in ("features", "logits", "topk_values"):
        if key in data and not np.isfinite(data[key].astype(np.float32)).all():
            problems.append(f"shard {name}: {key} holds NaN or inf")
    return problems


def recompute(store: FeatureStore, count: int, seed: int = 0, runtime: RuntimeConfig | None = None) -> list[dict]:
    """Re-run ``count`` random (sample, view) pairs through the teacher; one record per pair.

    ``runtime`` defaults to a GPU where there is one, else the CPU, at the store's own precision (fp32 for an
    fp16 store on a machine without a GPU).
    """
    m = store.manifest
    t = m["teacher"]
    if runtime is None:
        amp = {"fp32": "off", "bf16": "bf16", "fp16": "fp16" if torch.cuda.is_available() else "off"}
        runtime = RuntimeConfig(amp=amp[m.get("compute", COMPUTE_BEFORE_PRECISION)["precision"]])
    teacher = create_teacher(TeacherConfig(t["name"], t["weights"], m["preprocessing"]["input_size_override"],
                                           t.get("init_seed", 0)), runtime)
    if teacher.weights_sha256 != t["weights_sha256"]:
        raise GenddError(f"{store.url}: teacher weights {t['weights']} now hash to {teacher.weights_sha256[:12]}, "
                         f"the store was written with {t['weights_sha256'][:12]}")
    rng = np.random.default_rng(seed)
    picks = [(name, i) for name in store.shard_names for i in range(int(store.shard(name).attrs["count"]))]
    chosen = sorted(rng.choice(len(picks), size=min(count, len(picks)), replace=False).tolist())
    by_shard: dict[str, list[int]] = {}
    for c in chosen:
        by_shard.setdefault(picks[c][0], []).append(picks[c][1])
    dc, records = teacher.data_config, []
    replay = Replay(m, dc)
    for name, rows in by_shard.items():
        group = store.shard(name)
        keys = [str(k) for k in group["keys"][...]]
        wanted = {keys[r]: r for r in rows}
        arrays = {k: group[k][...] for k in VIEW_ARRAYS if k in group}
        source = group.attrs["source"]  # a relative one is relative to the project, the current directory
        samples = {s.key: s for s in ShardReader(source, on_error="skip", decode=False)
                   if isinstance(s, Sample) and ("mix" in arrays or s.key in wanted)}
        partners = [samples.get(k) for k in keys] if "mix" in arrays else None  # a mix's partner: any row
        for key, row in wanted.items():
            if key not in samples:
                continue
            sample, view = samples[key], int(rng.integers(m["views"]["count"]))
            try:
                pixels = replay.views(sample, {k: a[row] for k, a in arrays.items()}, partners, arrays, [view])
            except ValueError as exc:
                raise GenddError(f"{public_url(source)}: sample {sample.key}: {exc}") from exc
            feature = teacher(normalize_pixels(pixels, dc["mean"], dc["std"]))[0][0].numpy()
            stored = store.feature(name, row, view)
            cosine = float(feature @ stored / (np.linalg.norm(feature) * np.linalg.norm(stored) + 1e-12))
            records.append({"shard": name, "key": sample.key, "view": view, "cosine": cosine})
    return records


def verify(store: FeatureStore, recompute_count: int = 0, seed: int = 0, min_cosine: float = 0.99,
           runtime: RuntimeConfig | None = None) -> dict:
    """Check every shard, and optionally recompute samples; ``ok`` is False on any problem."""
    listed = [s["name"] for s in store.manifest["shards"]]
    problems = [f"shard {n}: listed in the manifest but missing or incomplete"
                for n in listed if n not in store.shard_names]
    for name in store.shard_names:
        problems += check_shard(store, name)
    records = recompute(store, recompute_count, seed, runtime) if recompute_count else []
    cosines = [r["cosine"] for r in records]
    problems += [f"shard {r['shard']}: key {r['key']} view {r['view']}: recomputed cosine {r['cosine']:.4f} "
                 f"< {min_cosine}" for r in records if r["cosine"] < min_cosine]
    return {
        "store": store.url,
        "shards": len(store.shard_names),
        "problems": problems,
        "recomputed": len(records),
        "cosine_min": min(cosines) if cosines else None,
        "cosine_mean": float(np.mean(cosines)) if cosines else None,
        "ok": not problems,
    }
