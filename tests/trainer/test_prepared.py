import torch

from segsearch.trainer.prepared import downsample_labels, sample_centres

IGNORE = 255


def test_single_pixel_points_survive_downsampling():
    labels = torch.full((1, 16, 16), IGNORE)
    labels[0, 1, 2] = 3  # a click in cell (0, 0)
    labels[0, 13, 14] = 1  # a click in cell (3, 3)
    small = downsample_labels(labels, num_classes=5)
    assert small.shape == (1, 4, 4)
    assert small[0, 0, 0] == 3 and small[0, 3, 3] == 1
    assert (small != IGNORE).sum() == 2


def test_majority_label_wins_and_ignore_does_not_count():
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, :2, :] = 2
    labels[0, 2, :3] = 4
    assert downsample_labels(labels, num_classes=5)[0, 0, 0] == 2


def test_sample_centres_picks_cell_centres():
    maps = torch.arange(64).view(1, 8, 8)
    assert sample_centres(maps).tolist() == [[[18, 22], [50, 54]]]


def test_downsampling_in_chunks_equals_all_at_once():
    """Hundreds of classes: the one-hot is built a chunk of images at a time, same result."""
    import torch

    from segsearch.trainer.prepared import downsample_labels

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 40, (7, 12, 12), generator=generator)
    labels[:, ::3] = 255
    assert torch.equal(downsample_labels(labels, 40, chunk=2), downsample_labels(labels, 40, chunk=100))
