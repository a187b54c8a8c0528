"""Small conveniences of the tests: the float input of one rendered view, and a feature shard written at once."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from gendd_pipe.data.render import render_pixels
from gendd_pipe.data.shards import Sample
from gendd_pipe.runtime import normalize_pixels
from gendd_pipe.store.format import ArraySpec
from gendd_pipe.store.writer import ShardWriter


def to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL RGB image -> normalized float tensor (3, H, W), as timm's eval transform ends."""
    return normalize_pixels(pil_to_tensor(image), mean, std)


def model_input(renderer: str, sample: Sample, views: np.ndarray, data_config: dict) -> torch.Tensor:
    """Views (V, 5) of ``sample`` as a network's float input (V, 3, H, W), on the CPU."""
    return normalize_pixels(render_pixels(renderer, sample, views, data_config), data_config["mean"],
                            data_config["std"])


def schema_of(arrays: dict[str, np.ndarray], int8: bool = False) -> dict[str, ArraySpec]:
    """The schema of a shard holding ``arrays`` as they are (``features`` as int8 plus scales when ``int8``)."""
    schema = {key: ArraySpec(key, data.shape[1:], "str" if data.dtype.kind in "OUT" else str(data.dtype))
              for key, data in arrays.items()}
    if int8:
        width = arrays["features"].shape[-1]
        schema["features"] = ArraySpec("features", arrays["features"].shape[1:], "int8", payload=True)
        schema["feature_scales"] = ArraySpec("feature_scales", (width,), "float32", per_chunk=True)
    return schema


def write_shard(store: str, name: str, arrays: dict[str, np.ndarray], attrs: dict, chunk: int, clevel: int,
                int8_floor: float | None = None) -> dict:
    """One feature shard's arrays written at once by a `ShardWriter` (int8 features where ``int8_floor`` is
    given); returns the attrs it committed."""
    schema = schema_of(arrays, int8=int8_floor is not None)
    writer = ShardWriter(store, name, schema, chunk, clevel, int8_floor or 0.0)
    try:
        writer.append(arrays)
        return writer.commit(attrs)
    finally:
        writer.close()


def per_row_net(net, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """GenDD's denoiser in its plain form, every row's whole condition computed from its own timestep, student
    condition and token position (the form the head's cached conditions must equal)."""
    c = net.time_embed(t) + net.cond_embed(cond) + net.pos_embed(pos)
    h = net.input_proj(x)
    for block in net.blocks:
        shift, scale, gate = block.modulation(c).chunk(3, dim=-1)
        h = h + gate * block.mlp(block.norm(h) * (1 + scale) + shift)
    shift, scale = net.final_modulation(c).chunk(2, dim=-1)
    return net.final_linear(net.final_norm(h) * (1 + scale) + shift)
