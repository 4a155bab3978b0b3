"""`segsearch query`, `segsearch segment` (pictures included) and `segsearch serve` with SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from segsearch.cli import main
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import SegsearchClient
from service_helpers import PHOTO, copy_index, mosaic_images, png_bytes


def test_query_prints_hits_and_writes_a_contact_sheet(served, corpus_dir, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    code = main(["query", str(corpus_dir / PHOTO), "--box", "40,30,140,120", "--top-k", "5",
                 "--server", served.address, "--out", str(sheet)])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+-?\d\.\d{3}\s+\d+", line)]
    assert len(rows) == 5 and f"contact sheet: {sheet}" in out
    with Image.open(sheet) as picture:
        assert picture.width > 6 * 224 and picture.height > 224  # query + 5 hits in one row
        pixels = np.asarray(picture.convert("RGB"))
    assert (np.abs(pixels.astype(int) - (40, 220, 255)).sum(axis=2) == 0).sum() > 50  # the query outline


def test_query_by_point_and_segment_id_as_json(served, corpus_dir, capsys):
    assert main(["query", str(corpus_dir / "mosaic3.png"), "--point", "20,20", "--top-k", "2", "--json",
                 "--server", served.address]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    segment_id = int(re.search(r'"segment_id": (\d+)', first).group(1))
    assert '"image_id": "mosaic3.png"' in first
    assert main(["query", "--segment-id", str(segment_id), "--top-k", "1", "--json", "--server", served.address]) == 0
    assert f'"segment_id": {segment_id}' in capsys.readouterr().out


def test_query_errors_are_one_line(served, corpus_dir, capsys):
    code = main(["query", str(corpus_dir / PHOTO), "--box", "0,0,999,10", "--server", served.address])
    err = capsys.readouterr().err
    assert code == 2 and "INVALID_ARGUMENT" in err and "outside the 256x192 image" in err and "Traceback" not in err


def test_segment_writes_an_overlay_and_maps(served, corpus_dir, tmp_path, capsys):
    overlay = tmp_path / "overlay.png"
    assert main(["segment", str(corpus_dir / PHOTO), "--out", str(overlay), "--maps", str(tmp_path / "m"),
                 "--server", served.address]) == 0
    out = capsys.readouterr().out
    count = int(re.search(r"(\d+) segments \(256x192\)", out).group(1))
    with Image.open(tmp_path / "m_segments.png") as segments:
        assert segments.mode == "I;16" and len(np.unique(np.asarray(segments))) == count
        values = np.asarray(segments)
    with Image.open(tmp_path / "m_segments_colour.png") as coloured:  # what a viewer shows
        rgb = np.asarray(coloured.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) == count and rgb.mean() > 30  # one visible colour per segment
    first = values.reshape(-1) == values.reshape(-1)[0]
    assert len(np.unique(rgb[first], axis=0)) == 1
    with Image.open(overlay) as picture:
        assert picture.width >= 2 * 256 and picture.height > 192


def _held_then_one_image(release: threading.Event, image: bytes):
    release.wait(30)
    yield pb.IndexImageRequest(image=pb.Image(data=image, image_id="late"))


def test_serve_drains_in_flight_calls_on_sigterm_and_exits_0(index_template, checkpoint_path, tmp_path_factory):
    index_dir = copy_index(index_template, tmp_path_factory)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "segsearch.cli", "serve", str(index_dir), "--model", str(checkpoint_path),
         "--port", "0", "--metrics-port", "0", "--grace", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        address = _wait_for_address(process)
        client = SegsearchClient(address, timeout=30)
        release = threading.Event()
        call = client.stub.IndexImages.future(_held_then_one_image(release, png_bytes(mosaic_images(1, seed=9)[0])))
        time.sleep(0.5)  # the call is open on the server
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # still draining
        release.set()
        response = call.result(timeout=30)
        assert [item.image_id for item in response.indexed] == ["late"]
        assert process.wait(timeout=30) == 0
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    from segsearch.indexer.index_store import IndexStore

    with IndexStore.open(index_dir) as store:  # the late image was committed and flushed
        assert store.verify() == [] and store.get_image("late").segment_ids


def _wait_for_address(process: subprocess.Popen) -> str:
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving .* on (\S+):(\d+)", line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            return f"{match.group(1)}:{match.group(2).rstrip(',')}"
    raise AssertionError("the server did not start:\n" + "".join(lines))


@pytest.mark.parametrize("command", [["query", "x.png", "--box", "0,0,4,4"], ["segment", "x.png"],
                                     ["serve", "idx", "--model", "m.pt"]])
def test_a_token_on_the_command_line_is_refused_without_echoing_it(command, capsys):
    for form in (["--token", "SECRET-VALUE-1"], ["--token=SECRET-VALUE-1"]):
        with pytest.raises(SystemExit) as exited:
            main(command + form)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "--token-file" in err and "SECRET-VALUE-1" not in err


def test_an_unlabelled_segment_prints_as_no_label_not_as_a_blank():
    from segsearch.service.cli import label_text

    assert label_text("cat", 0.75) == "cat (0.75)" and label_text("", 0.0) == "(no label)"
