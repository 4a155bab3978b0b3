"""Batched segmentation: masks partition each image, prototypes, the tiny-segment rule, labels."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsearch.indexer.rle import encode_mask, mask_box
from segsearch.spml.segmenter import (
    Segmenter,
    SegmenterConfig,
    StageTimes,
    label_map_rles,
    merge_small_segments,
    resize_for_embedding,
    segment_images,
    upsample_nearest,
)
from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.label_vote import knn_vote, vote_details

from model_helpers import SEGMENTER, photo, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return load_checkpoint(tiny_checkpoint(tmp_path_factory))


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint.build_model()


@pytest.fixture(scope="module")
def images():
    """Three sizes and aspects in one batch, one of them smaller than the embedding map."""
    return [photo("astronaut", 72), photo("coffee", 90), np.ascontiguousarray(photo("chelsea", 40)[:9, :13])]


# ---- the tiny-segment rule, on hand-made maps ------------------------------------------------

def test_tiny_segment_goes_to_the_neighbour_with_the_longest_border():
    ids = np.zeros((10, 10), np.int64)
    ids[:, 5:] = 1
    ids[4, 4] = 2  # 1 pixel: borders 0 on three sides, 1 on one side
    merged = merge_small_segments(ids, 3, min_area_fraction=0.05)
    assert merged[4, 4] == 0
    assert (merged[:, 5:] == 1).all() and set(np.unique(merged)) == {0, 1}


def test_merging_is_repeated_until_nothing_is_tiny_and_survivors_keep_their_index():
    ids = np.full((20, 20), 3, np.int64)
    ids[0:2, 0:2] = 0   # 4 px, touches only 1
    ids[0:2, 2:4] = 1   # 4 px, touches 0 and 3
    ids[10:20, 10:20] = 2  # 100 px
    merged = merge_small_segments(ids, 4, min_area_fraction=0.05)  # threshold 20 px
    assert set(np.unique(merged)) == {2, 3}
    assert (merged[10:20, 10:20] == 2).all()
    counts = np.bincount(merged.ravel())
    assert counts[counts > 0].min() >= 20


def test_nothing_changes_without_tiny_segments_and_a_lone_segment_stays():
    ids = np.repeat(np.arange(4), 25).reshape(10, 10)
    np.testing.assert_array_equal(merge_small_segments(ids, 4, 0.1), ids)
    np.testing.assert_array_equal(merge_small_segments(np.zeros((5, 5), np.int64), 1, 0.5), 0)


def test_fast_rle_of_a_label_map_equals_encode_mask_per_segment():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (16, 23)]:
        label_map = rng.integers(-1, 4, size=shape).astype(np.int32)
        label_map.flat[0] = 0
        rles = label_map_rles(label_map, 4)
        for n in range(4):
            assert rles[n] == encode_mask(label_map == n)


def test_upsample_nearest_matches_torch_nearest_exact():
    low = torch.arange(20).view(4, 5)
    for size in [(8, 10), (7, 13), (3, 2)]:
        expected = F.interpolate(low[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        np.testing.assert_array_equal(upsample_nearest(low.numpy(), *size), expected.numpy())


# ---- on a real (tiny) model ------------------------------------------------------------------

def test_masks_partition_each_image_with_tight_boxes(model, checkpoint, images):
    timings = StageTimes()
    results = segment_images(model, checkpoint.label_bank, images, SEGMENTER, timings=timings)
    assert len(results) == len(images)
    for image, result in zip(images, results):
        assert result.shape == image.shape[:2]
        assert 1 <= len(result.segments) <= SEGMENTER.kmeans().num_segments
        cover = np.zeros(image.shape[:2], int)
        for segment, rle in zip(result.segments, result.masks_rle()):
            mask = segment.mask
            cover += mask
            assert mask.any() and segment.box == mask_box(mask)
            assert segment.area_fraction == pytest.approx(mask.mean())
            assert rle == encode_mask(mask)
        assert (cover == 1).all()  # every pixel in exactly one segment
    assert timings.embed > 0 and timings.segment > 0 and timings.label > 0


def test_prototypes_are_normalised_mean_embeddings(model, checkpoint):
    """Without refinement or snapping the map is the embedding map's segments upsampled (nearest); each
    prototype is the normalised mean of its segment's embeddings."""
    size = SEGMENTER.embed_size
    image = resize_for_embedding(photo("rocket", 96), size)  # already E x E: no resizing
    config = dataclasses.replace(SEGMENTER, refine_size=0, snap_size=0)
    (result,) = segment_images(model, checkpoint.label_bank, [image], config)
    with torch.no_grad():
        embedding = model(torch.from_numpy(image).permute(2, 0, 1)[None].float())[0]  # (D, h, w)
    stride = size // embedding.shape[-1]
    low_res = torch.from_numpy(result.label_map[::stride, ::stride].astype(np.int64))
    np.testing.assert_array_equal(upsample_nearest(low_res.numpy(), size, size), result.label_map)
    for segment in result.segments:
        mean = embedding[:, low_res == segment.index].mean(dim=1)
        np.testing.assert_allclose(segment.prototype, F.normalize(mean, dim=0).numpy(), atol=1e-5)
        assert np.linalg.norm(segment.prototype) == pytest.approx(1.0, abs=1e-5)


def test_labels_are_the_knn_vote_over_the_checkpoint_bank(model, checkpoint, images):
    results = segment_images(model, checkpoint.label_bank, images, SEGMENTER)
    protos = torch.from_numpy(np.stack([s.prototype for r in results for s in r.segments]))
    names = checkpoint.config.class_names
    labels, shares = knn_vote(protos, checkpoint.label_bank, len(names), k=SEGMENTER.knn_k)
    assert [s.label for r in results for s in r.segments] == [names[i] for i in labels.tolist()]
    np.testing.assert_allclose([s.label_score for r in results for s in r.segments], shares.numpy(), atol=1e-6)


def _nearest_similarity(results, bank, num_classes) -> np.ndarray:
    protos = torch.from_numpy(np.stack([s.prototype for r in results for s in r.segments]))
    return vote_details(protos, bank, num_classes, k=SEGMENTER.knn_k).nearest_similarity.numpy()


def test_a_bank_that_covers_no_segment_gives_empty_labels_and_score_zero(model, checkpoint, images):
    bank, num_classes = checkpoint.label_bank, len(checkpoint.config.class_names)
    nearest = _nearest_similarity(segment_images(model, bank, images, SEGMENTER), bank, num_classes)
    assert nearest.max() < 0.999
    far = dataclasses.replace(bank, min_similarity=float(nearest.max()) + 1e-3)  # no segment is that near
    segmenter = Segmenter(model, far, SEGMENTER)
    for result in segmenter(images):
        for level in (result.segments, result.regions.segments, segmenter.regions_at(result, 2).segments):
            assert level and all(s.label == "" and s.label_score == 0.0 for s in level)


def test_segments_below_the_bank_s_min_similarity_lose_their_label_and_only_those(model, checkpoint, images):
    bank, names = checkpoint.label_bank, checkpoint.config.class_names
    closed = segment_images(model, bank, images, SEGMENTER)
    nearest = _nearest_similarity(closed, bank, len(names))
    threshold = float(np.median(nearest))
    segments = [s for r in segment_images(model, dataclasses.replace(bank, min_similarity=threshold), images,
                                          SEGMENTER) for s in r.segments]
    before = [s for r in closed for s in r.segments]
    assert 0 < sum(s.label == "" for s in segments) < len(segments)
    for segment, was, similarity in zip(segments, before, nearest):
        if similarity >= threshold:
            assert (segment.label, segment.label_score) == (was.label, was.label_score) and segment.label
        else:
            assert (segment.label, segment.label_score) == ("", 0.0)


def test_batched_equals_one_image_at_a_time(model, checkpoint, images):
    together = segment_images(model, checkpoint.label_bank, images, SEGMENTER)
    for image, batched in zip(images, together):
        (alone,) = segment_images(model, checkpoint.label_bank, [image], SEGMENTER)
        np.testing.assert_array_equal(alone.label_map, batched.label_map)
        np.testing.assert_allclose(np.stack([s.prototype for s in alone.segments]),
                                   np.stack([s.prototype for s in batched.segments]), atol=1e-5)


def test_no_segment_below_the_minimum_area(model, checkpoint):
    """The rule holds on the embedding map; snapping borders to contours may then move a
    border by a pixel or two, so it is off here."""
    image = resize_for_embedding(photo("astronaut", 96), 64)  # multiple of the map: exact areas
    for fraction in (0.0, 0.04, 0.15):
        config = SegmenterConfig(embed_size=64, grid=(6, 6), iterations=5, min_area_fraction=fraction,
                                 snap_size=0)
        (result,) = segment_images(model, checkpoint.label_bank, [image], config)
        assert min(s.area_fraction for s in result.segments) >= fraction
        assert sum(s.area_fraction for s in result.segments) == pytest.approx(1.0)
    assert len(result.segments) <= int(1 / 0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_segments(model, checkpoint, images):
    on_cpu = segment_images(model, checkpoint.label_bank, images, SEGMENTER)
    on_gpu = Segmenter(checkpoint.build_model().to("cuda"), checkpoint.label_bank, SEGMENTER)(images)
    for a, b in zip(on_cpu, on_gpu):
        assert (a.label_map == b.label_map).mean() > 0.99
        if np.array_equal(a.label_map, b.label_map):
            np.testing.assert_allclose(np.stack([s.prototype for s in a.segments]),
                                       np.stack([s.prototype for s in b.segments]), atol=1e-4)


# ---- refined borders and the region hierarchy ------------------------------------------------

def test_refined_borders_are_not_aligned_to_the_stride(model, checkpoint):
    size = SEGMENTER.embed_size
    image = resize_for_embedding(photo("astronaut", 96), size)
    (result,) = segment_images(model, checkpoint.label_bank, [image], SEGMENTER)
    stride = size // (size // 4)
    label_map = result.label_map
    across_x = np.flatnonzero((label_map[:, 1:] != label_map[:, :-1]).any(axis=0)) + 1
    across_y = np.flatnonzero((label_map[1:] != label_map[:-1]).any(axis=1)) + 1
    # nearest upsampling could only change label at multiples of the stride
    assert (across_x % stride != 0).any() and (across_y % stride != 0).any()
    cover = sum(segment.mask.astype(int) for segment in result.segments)
    assert (cover == 1).all()


def test_regions_are_unions_of_fine_segments_with_exact_prototypes(model, checkpoint, images):
    segmenter = Segmenter(model, checkpoint.label_bank, SEGMENTER)
    for result in segmenter(images):
        num = len(result.segments)
        assert result.tree.num_leaves == num and result.parents.shape == (max(2 * num - 1, 0),)
        assert result.leaf_sums.shape == (num, result.segments[0].prototype.size)
        for level in (result.regions, segmenter.regions_at(result, 2)):
            leaf_regions = level.leaf_regions
            assert leaf_regions.shape == (num,)
            np.testing.assert_array_equal(level.label_map, np.append(leaf_regions, -1)[result.label_map])
            for region in level.segments:
                members = np.flatnonzero(leaf_regions == region.index)
                total = result.leaf_sums[members].sum(axis=0)
                np.testing.assert_allclose(region.prototype, total / np.linalg.norm(total), atol=1e-5)
                assert region.box == mask_box(region.mask)
                assert region.area_fraction == pytest.approx(region.mask.mean())
        assert len(segmenter.regions_at(result, 2).segments) == min(2, num)
        assert len(segmenter.regions_at(result, 10**6).segments) == num


def test_regions_off_gives_the_same_fine_segments_and_no_hierarchy(model, checkpoint, images):
    """`regions=False` (an index stored without regions) skips the hierarchy and nothing else."""
    with_regions = Segmenter(model, checkpoint.label_bank, SEGMENTER)(images)
    fine_only = Segmenter(model, checkpoint.label_bank, dataclasses.replace(SEGMENTER, regions=False))
    results = fine_only(images)
    for full, fine in zip(with_regions, results, strict=True):
        assert fine.regions is None and fine.tree is None
        np.testing.assert_array_equal(fine.label_map, full.label_map)
        np.testing.assert_allclose(fine.leaf_sums, full.leaf_sums)
        assert [(s.box, s.label, s.label_score) for s in fine.segments] == \
               [(s.box, s.label, s.label_score) for s in full.segments]
    with pytest.raises(ValueError, match="no region hierarchy"):
        fine_only.regions_at(results[0], 2)
