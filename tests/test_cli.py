"""User mistakes give one line that says what to do, exit status 2, and no traceback."""
import numpy as np
import pytest
from PIL import Image

from segsearch.cli import build_parser, main
from segsearch.spml.checkpoint import Checkpoint, save_checkpoint
from segsearch.spml.embedding import EmbeddingNet, ModelConfig

SMALL = ["--backbone", "small", "--edge-source", "sobel", "--steps", "1", "--no-progress"]


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, *phrases):
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def _voc_tree(root, ids, corrupt=()):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    for image_id in ids:
        path = root / "JPEGImages" / f"{image_id}.jpg"
        if image_id in corrupt:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        else:
            Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(path)
        mask = Image.fromarray(np.zeros((20, 30), np.uint8), mode="P")
        mask.save(root / "SegmentationClass" / f"{image_id}.png")


def test_missing_dataset_path(capsys, tmp_path):
    code, err = _run(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")] + SMALL)
    _assert_one_line_error(code, err, "nowhere")


def test_empty_image_list(capsys, tmp_path):
    _voc_tree(tmp_path / "voc", ids=[])
    code, err = _run(capsys, ["train", "--data", str(tmp_path / "voc"), "--out", str(tmp_path / "r")] + SMALL)
    _assert_one_line_error(code, err, "train")


def test_corrupt_image_names_the_file(capsys, tmp_path):
    _voc_tree(tmp_path / "voc", ids=["a", "b"], corrupt={"b"})
    code, err = _run(capsys, ["train", "--data", str(tmp_path / "voc"), "--out", str(tmp_path / "r")] + SMALL)
    _assert_one_line_error(code, err, "b.jpg")


def test_resume_from_checkpoint_of_another_config(capsys, tmp_path):
    config = ModelConfig(backbone="small", pretrained=False, embedding_dim=32, class_names=["x"])
    save_checkpoint(Checkpoint(config, EmbeddingNet(config).state_dict()), tmp_path / "r" / "checkpoint.pt")
    code, err = _run(capsys, ["train", "--out", str(tmp_path / "r"), "--resume", "--num-train", "8",
                              "--image-size", "32"] + SMALL)
    _assert_one_line_error(code, err, "embedding_dim=32 (expected 64)")


def test_eval_missing_checkpoint(capsys, tmp_path):
    code, err = _run(capsys, ["eval", str(tmp_path / "none.pt")])
    _assert_one_line_error(code, err, "not found", "segsearch train")


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_help_explains_every_flag(command):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    subcommand = subparsers.choices[command]
    undocumented = [a.option_strings or a.dest for a in subcommand._actions
                    if a.dest != "help" and not (a.help and len(a.help) > 3)]
    assert not undocumented
