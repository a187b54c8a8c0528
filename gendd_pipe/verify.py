"""``gendd-pipe verify``: a store's bytes checked (`gendd_pipe.store.audit`), and with ``--recompute N``, N
random (sample, view) pairs re-run through the teacher the manifest names, from the source shards, replayed as
extraction rendered them (`gendd_pipe.data.replay`), their cosine to the stored features reported.
"""

from __future__ import annotations

import numpy as np
import torch

from gendd_pipe.data.replay import Replay
from gendd_pipe.data.shards import Sample, ShardReader
from gendd_pipe.errors import GenddError
from gendd_pipe.files import public_url
from gendd_pipe.models.teacher import TeacherConfig, create_teacher
from gendd_pipe.runtime import RuntimeConfig, normalize_pixels
from gendd_pipe.store.audit import check_store
from gendd_pipe.store.format import COMPUTE_BEFORE_PRECISION, VIEW_ARRAYS
from gendd_pipe.store.reader import FeatureStore


def recompute(store: FeatureStore, count: int, seed: int = 0, runtime: RuntimeConfig | None = None) -> list[dict]:
    """Re-run ``count`` random (sample, view) pairs through the teacher; one record per pair.

    ``runtime`` defaults to a GPU where there is one, else the CPU, at the store's own precision (fp32 for an
    fp16 store on a machine without a GPU).
    """
    manifest = store.manifest
    t = manifest["teacher"]
    if runtime is None:
        amp = {"fp32": "off", "bf16": "bf16", "fp16": "fp16" if torch.cuda.is_available() else "off"}
        runtime = RuntimeConfig(amp=amp[manifest.get("compute", COMPUTE_BEFORE_PRECISION)["precision"]])
    teacher = create_teacher(TeacherConfig(t["name"], t["weights"], manifest["preprocessing"]["input_size_override"],
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
    replay = Replay(manifest, dc)
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
            sample, view = samples[key], int(rng.integers(manifest["views"]["count"]))
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
    problems = check_store(store)
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
