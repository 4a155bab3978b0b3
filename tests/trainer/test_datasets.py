import numpy as np
import pytest
from PIL import Image

from segsearch.errors import DatasetError
from segsearch.trainer.datasets import DataConfig, _fit_square, load_split
from segsearch.trainer.sample import IGNORE_INDEX, Sample


def test_padding_is_marked_invalid_not_just_unlabelled():
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 40), dtype=np.int64)
    mask[5, 5] = IGNORE_INDEX  # a void pixel inside the image stays valid
    fitted = _fit_square(Sample(image, mask, "wide"), 16)
    assert fitted.valid.shape == (16, 16)
    assert fitted.valid[:8].all() and not fitted.valid[8:].any()  # 20x40 -> 8x16, then padding
    assert (fitted.mask[8:] == IGNORE_INDEX).all() and (fitted.image[8:] == 0).all()
    assert Sample(image, mask, "plain").valid_mask().all()


def _texture_folder(folder, count, side=48):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-20, 20, size=(side, side + 8 * number, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"tex{number}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_texture_folder_makes_mosaics_with_one_class_per_picture(tmp_path):
    folder = _texture_folder(tmp_path / "textures", 4)
    config = DataConfig(dataset=f"textures:{folder}", image_size=32, num_train=6, num_test=2)
    train, test = load_split(config, "train"), load_split(config, "test")
    assert train.class_names == test.class_names == ["tex0", "tex1", "tex2", "tex3"]
    assert len(train.samples) == 6 and len(test.samples) == 2
    for sample in train.samples:
        assert sample.image.shape == (32, 32, 3) and set(np.unique(sample.mask)) <= {0, 1, 2, 3}
        assert len(np.unique(sample.mask)) >= 2


@pytest.mark.parametrize("count, message", [(1, "at least 2"), (0, "at least 2")])
def test_texture_folder_too_small_is_refused(tmp_path, count, message):
    folder = _texture_folder(tmp_path / "textures", count)
    with pytest.raises(DatasetError, match=message):
        load_split(DataConfig(dataset=f"textures:{folder}", image_size=32), "train")


def test_texture_folder_missing_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(DataConfig(dataset=f"textures:{tmp_path / 'nothing'}"), "train")


def test_mosaic_val_split_holds_new_images_of_the_training_band():
    config = DataConfig(image_size=32, num_train=4, num_val=3, num_test=2)
    train, val = load_split(config, "train"), load_split(config, "val")
    longer = load_split(DataConfig(image_size=32, num_train=7, num_test=2), "train")
    assert [s.image_id for s in val.samples] == [f"mosaic-train-{i}" for i in (4, 5, 6)]
    for mine, same in zip(train.samples + val.samples, longer.samples):
        np.testing.assert_array_equal(mine.image, same.image)  # val continues the band's sequence
    train_ids = {s.image_id for s in train.samples}
    assert train_ids.isdisjoint(s.image_id for s in val.samples)


def test_unknown_split_and_voc_val_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="split must be one of"):
        load_split(DataConfig(image_size=32), "holdout")
    with pytest.raises(DatasetError, match="no validation split"):
        load_split(DataConfig(dataset=str(tmp_path)), "val")
