"""Ordinary mistakes end in one clear line and a non-zero exit, never a traceback (each case
here once gave a traceback or a misleading message)."""
import socket

import pytest
from PIL import Image

from segsearch.cli import main


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    return tmp_path


CASES = {
    "train --steps 0": (["train", "--steps", "0", "--out", "r"], "invalid setting: steps"),
    "eval an image": (["eval", "photo.png"], "photo.png is not a segsearch checkpoint"),
    "eval a run folder without a checkpoint": (["eval", "runs/x"], "no checkpoint.pt in it"),
    "query --out without extension": (["query", "photo.png", "--box", "0,0,4,4", "--out", "sheet"],
                                      "ending in .png"),
    "query --out a folder": (["query", "photo.png", "--box", "0,0,4,4", "--out", "runs"], "is a folder"),
    "query IMAGE with --segment-id": (["query", "photo.png", "--segment-id", "3"], "would be ignored"),
    "segment --out without extension": (["segment", "photo.png", "--out", "overlay"], "ending in .png"),
    "segment --maps into no folder": (["segment", "photo.png", "--maps", "nodir/m"], "does not exist"),
    "load with nobody listening": (["load", "--ids", "1-5", "--requests", "3", "--server", "127.0.0.1:1",
                                    "--timeout", "0.5"], "none of the 3 calls succeeded"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_clear_line_and_a_non_zero_exit(case, folder, capsys):
    argv, phrase = CASES[case]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_a_busy_metrics_port_is_one_line(folder, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = main(["serve", "no-index", "--model", "no.pt", "--port", "0", "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert status == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
