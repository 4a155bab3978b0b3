"""Hostile inputs for every field the server decodes, as hypothesis strategies, and a raw client.

What is covered (the proto's request fields): image bytes (named hostile files: decompression
bombs, 1x1 / 100000x1, 16-bit, palette, CMYK, EXIF-rotated, truncated, not images; random
generated images in every mode and format; mutated files; random bytes), mask PNGs (right
and wrong sizes, empty, other modes, not PNG, truncated, bombs), boxes and points (in and out
of bounds, int32 extremes), filters, top_k, min_score (NaN, inf), model_version, segment ids
(0 .. 2^64-1), search_effort (negative, int32 extremes), SearchSimilarBatch batches of such
requests (empty too), image ids (unicode, 500/501 bytes, paths, NUL), IndexImages streams (pool
images, hostile ones, hostile ids and uris), DeleteImages image and segment id lists, and raw
wire bytes that are not a valid message at all.

`FuzzClient` sends a `Call` (serialized messages, so that raw bytes go out as they are) with a
deadline and returns an `Outcome`; `violations` says what in an outcome breaks the contract:
a status the method may not answer (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED = a hang, ...),
or, for SearchSimilar (and each query of a batch), a status or a response that contradicts
the request.

IndexImages only ever sends images of a fixed pool (plus undecodable ones), so that the
index grows by a bounded amount however long a run is: pool images are deduplicated by
content after their first addition. DeleteImages names pool ids and random ids, never the
test index's own images, and segment ids from 2^50 up (no index in a test holds those).
"""
from __future__ import annotations

import functools
import itertools
import math
import time
import zlib
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import strategies as st
from PIL import Image

from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.testing.images import encode, jpeg_claiming, png_chunk, png_claiming  # noqa: F401  (its callers import them from here)


INT32_MIN, INT32_MAX, UINT64_MAX = -(2 ** 31), 2 ** 31 - 1, 2 ** 64 - 1
SERVICE = pb.DESCRIPTOR.services_by_name["SegmentSearch"]
METHODS = {method.name: method for method in SERVICE.methods}

# Every status each method may answer to any input (no token, no TLS, no load beyond its limit).
ALLOWED_CODES = {
    "SearchSimilar": {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    "SearchSimilarBatch": {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    "Segment": {"OK", "INVALID_ARGUMENT"},
    "GetSegment": {"OK", "NOT_FOUND", "INVALID_ARGUMENT"},
    "IndexImages": {"OK", "INVALID_ARGUMENT"},
    "DeleteImages": {"OK", "INVALID_ARGUMENT", "NOT_FOUND"},
    "GetInfo": {"OK", "INVALID_ARGUMENT"},
}


# ---- images ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostileImage:
    """name: what it is; size: (W, H) as sent (after EXIF) when it decodes, else None;
    expect: "ok", or the phrase the INVALID_ARGUMENT message must hold."""

    name: str
    data: bytes = field(repr=False)
    size: tuple[int, int] | None
    expect: str = "ok"


def noise(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """(H, W, C) uint8 random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG of `pixels` as stored, with an EXIF orientation tag (6: shown rotated 90 deg clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=100, exif=exif.tobytes())


def _palette_png() -> bytes:
    image = Image.fromarray(noise(40, 30, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, transparency=0)


def _multipage_tiff() -> bytes:
    frames = [Image.fromarray(noise(24, 20, seed)) for seed in range(3)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def _bad_crc_png() -> bytes:
    data = bytearray(encode(Image.fromarray(noise(32, 32, 5))))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    return bytes(data)


def _text_bomb_png() -> bytes:
    """An 8x8 PNG with a zTXt chunk that inflates to 20 MB (PIL caps text chunks)."""
    data = encode(Image.new("L", (8, 8), 128))
    ztxt = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * 20_000_000, 9))
    return data[:33] + ztxt + data[33:]


@functools.lru_cache(maxsize=1)
def hostile_images() -> tuple[HostileImage, ...]:
    """The named hostile files; built once per process."""
    rgb = noise(64, 48, 1)
    png, jpeg = encode(Image.fromarray(rgb)), encode(Image.fromarray(rgb), "JPEG")
    return (
        HostileImage("empty", b"", None, "is empty"),
        HostileImage("text", b"GET /etc/passwd HTTP/1.0\r\n\r\n", None, "not_an_image"),
        HostileImage("random_bytes", bytes(np.random.default_rng(7).integers(1, 255, 512, dtype=np.uint8)),
                     None, "not_an_image"),
        HostileImage("gif", encode(Image.new("L", (8, 8), 255), "GIF"), None, "not_an_image"),
        HostileImage("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", None, "not_an_image"),
        HostileImage("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', None, "not_an_image"),
        HostileImage("png_header_only", png[:33], None, "corrupt"),
        HostileImage("png_truncated", png[: len(png) // 2], None, "corrupt"),
        HostileImage("png_bad_crc", _bad_crc_png(), None, "corrupt"),
        HostileImage("png_zero_width", png_claiming(0, 10), None, "corrupt"),
        HostileImage("png_ztxt_bomb", _text_bomb_png(), None, "corrupt"),
        HostileImage("jpeg_truncated", jpeg[: len(jpeg) // 2], None, "corrupt"),
        HostileImage("png_bomb_100000x100000", png_claiming(100_000, 100_000), None, "too_many_pixels"),
        HostileImage("png_bomb_2^31x2^31", png_claiming(2 ** 31 - 1, 2 ** 31 - 1), None, "too_many_pixels"),
        HostileImage("png_bomb_8000x8000", png_claiming(8000, 8000), None, "too_many_pixels"),  # over 50 MP
        HostileImage("png_bomb_16bit_rgba", png_claiming(30_000, 30_000, 16, 6), None, "too_many_pixels"),
        HostileImage("jpeg_bomb_65000x65000", jpeg_claiming(65_000, 65_000), None, "too_many_pixels"),
        HostileImage("png_1x1", encode(Image.new("RGB", (1, 1), (200, 10, 10))), (1, 1)),
        HostileImage("png_100000x1", encode(Image.fromarray(noise(100_000, 1, 2))), (100_000, 1)),
        HostileImage("png_1x100000", encode(Image.fromarray(noise(1, 100_000, 3))), (1, 100_000)),
        HostileImage("png_3000x3000", encode(Image.new("RGB", (3000, 3000), (20, 140, 60))), (3000, 3000)),
        HostileImage("png_16bit", encode(Image.fromarray(noise(40, 30, 4, 1)[..., 0].astype(np.uint16) * 257)),
                     (40, 30)),
        HostileImage("png_palette_transparent", _palette_png(), (40, 30)),
        HostileImage("png_1bit", encode(Image.fromarray(noise(33, 17, 5, 1)[..., 0] > 127)), (33, 17)),
        HostileImage("png_la", encode(Image.fromarray(noise(20, 20, 6, 2), mode="LA")), (20, 20)),
        HostileImage("png_rgba", encode(Image.fromarray(noise(20, 24, 8, 4), mode="RGBA")), (20, 24)),
        HostileImage("jpeg_cmyk", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), (64, 48)),
        HostileImage("jpeg_exif_rotated", exif_rotated_jpeg(rgb), (48, 64)),
        HostileImage("jpeg_progressive", encode(Image.fromarray(rgb), "JPEG", progressive=True), (64, 48)),
        HostileImage("jpeg_grey", encode(Image.fromarray(rgb).convert("L"), "JPEG"), (64, 48)),
        HostileImage("webp", encode(Image.fromarray(rgb), "WEBP"), (64, 48)),
        HostileImage("bmp", encode(Image.fromarray(rgb), "BMP"), (64, 48)),
        HostileImage("tiff_float", encode(Image.fromarray(noise(16, 12, 9, 1)[..., 0].astype(np.float32) - 100.0),
                                          "TIFF"), (16, 12)),
        HostileImage("tiff_multipage", _multipage_tiff(), (24, 20)),
    )


def hostile_image(name: str) -> HostileImage:
    return next(image for image in hostile_images() if image.name == name)


MODES_BY_FORMAT = {"PNG": ("RGB", "L", "RGBA", "P", "I;16", "1", "LA"), "JPEG": ("RGB", "L", "CMYK"),
                   "WEBP": ("RGB", "RGBA"), "BMP": ("RGB", "L", "P", "1"), "TIFF": ("RGB", "L", "RGBA", "I;16", "F")}


def render(width: int, height: int, seed: int, fmt: str, mode: str) -> bytes:
    """A random image of `width` x `height` in `fmt` and `mode`."""
    pixels = noise(width, height, seed)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(pixels[..., 0].astype(np.float32) / 7.0)
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    elif mode != "RGB":
        image = image.convert(mode)
    return encode(image, fmt)


@st.composite
def generated_images(draw) -> HostileImage:
    """A small random image in any mode and format the server reads."""
    fmt = draw(st.sampled_from(sorted(MODES_BY_FORMAT)))
    mode = draw(st.sampled_from(MODES_BY_FORMAT[fmt]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    return HostileImage(f"generated_{fmt}_{mode}", render(width, height, draw(st.integers(0, 2 ** 16)), fmt, mode),
                        (width, height))


@st.composite
def mutated_images(draw) -> HostileImage:
    """A decodable file truncated, with bytes flipped, or with bytes inserted (size unknown)."""
    base = draw(st.sampled_from([image for image in hostile_images() if image.size and len(image.data) < 200_000]))
    data = bytearray(base.data)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(("truncate", "flip", "insert")))
        if action == "truncate":
            del data[where:]
        elif action == "flip" and data:
            data[where] ^= draw(st.integers(1, 255))
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
    return HostileImage(f"mutated_{base.name}", bytes(data), None, "")


def images() -> st.SearchStrategy[HostileImage]:
    """Any image input: named hostile files, generated images, mutated files, random bytes."""
    return st.one_of(
        st.sampled_from(hostile_images()),
        generated_images(),
        mutated_images(),
        st.binary(max_size=256).map(lambda data: HostileImage("random", data, None, "")),
    )


@functools.lru_cache(maxsize=1)
def index_pool() -> tuple[tuple[str, bytes], ...]:
    """The only decodable images IndexImages sends: (image id, bytes) of 12 small images."""
    formats = [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "I;16"), ("WEBP", "RGB"), ("PNG", "P"), ("TIFF", "L")]
    return tuple((f"fuzz-pool-{n}", render(24 + 3 * n, 40 - 2 * n, 1000 + n, *formats[n % len(formats)]))
                 for n in range(12))


# ---- masks and regions -----------------------------------------------------------------

def _mask_image(mask: np.ndarray, mode: str) -> Image.Image:
    values = mask.astype(np.uint8) * 255
    if mode == "1":
        return Image.fromarray(mask)
    if mode == "I;16":
        return Image.fromarray(mask.astype(np.uint16) * 65535)
    if mode == "P":
        return Image.fromarray(values).convert("P")
    if mode in ("RGBA", "LA", "RGB"):
        return Image.fromarray(values).convert(mode)
    return Image.fromarray(values, mode="L")


@st.composite
def rectangle_masks(draw, size: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask: a rectangle (maybe empty), plus noise on small images."""
    width, height = size
    x0, x1 = sorted(draw(st.tuples(st.integers(0, width), st.integers(0, width))))
    y0, y1 = sorted(draw(st.tuples(st.integers(0, height), st.integers(0, height))))
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    if width * height <= 64 * 64 and draw(st.booleans()):
        mask ^= np.random.default_rng(draw(st.integers(0, 99))).random((height, width)) < 0.1
    return mask


@st.composite
def mask_pngs(draw, size: tuple[int, int] | None) -> bytes:
    """Mask bytes for an image of `size` (W, H), right or wrong in every way."""
    kind = draw(st.sampled_from(("right", "right", "empty", "wrong_size", "transposed", "not_png",
                                 "truncated", "bomb", "random")))
    width, height = size or (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    if kind == "wrong_size":
        width += draw(st.integers(1, 3))
    elif kind == "transposed":
        width, height = height, width
    elif kind == "bomb":
        return png_claiming(draw(st.sampled_from((width, 100_000))), draw(st.sampled_from((height, 100_000))))
    elif kind == "random":
        return draw(st.binary(max_size=128))
    mask = np.zeros((height, width), bool) if kind == "empty" else draw(rectangle_masks((width, height)))
    image = _mask_image(mask, draw(st.sampled_from(("L", "1", "I;16", "P", "RGBA", "LA", "RGB"))))
    if kind == "not_png":
        fmt = draw(st.sampled_from(("JPEG", "GIF", "BMP", "TIFF")))
        return encode(image.convert("L"), fmt)
    data = encode(image)
    return data[: draw(st.integers(0, len(data) - 1))] if kind == "truncated" else data


def coordinates(limit: int | None) -> st.SearchStrategy[int]:
    """A coordinate near [0, limit] most of the time, any int32 sometimes."""
    edges = st.sampled_from((INT32_MIN, -1, 0, 1, INT32_MAX))
    if limit is None:
        return st.one_of(edges, st.integers(INT32_MIN, INT32_MAX), st.integers(-2, 70))
    return st.one_of(edges, st.integers(-2, limit + 2), st.integers(0, limit))


@st.composite
def regions(draw, size: tuple[int, int] | None) -> pb.Region:
    shape = draw(st.sampled_from(("box", "box", "point", "mask", "mask", "none")))
    width, height = size or (None, None)
    if shape == "box":
        xs = draw(st.tuples(coordinates(width), coordinates(width)))
        ys = draw(st.tuples(coordinates(height), coordinates(height)))
        if draw(st.booleans()):
            xs, ys = sorted(xs), sorted(ys)
        return pb.Region(box=pb.Box(x0=xs[0], y0=ys[0], x1=xs[1], y1=ys[1]))
    if shape == "point":
        return pb.Region(point=pb.Point(x=draw(coordinates(width)), y=draw(coordinates(height))))
    if shape == "mask":
        return pb.Region(mask_png=draw(mask_pngs(size)))
    return pb.Region()


# ---- scalars, ids, filters ---------------------------------------------------------------

HOSTILE_IDS = ("", " ", "/etc/passwd", "file:///etc/passwd", "../../../../etc/shadow", "\x00", "a\x00b",
               "C:\\Windows\\win.ini", "http://127.0.0.1:1/x", "é" * 250, "é" * 251, "a" * 500, "a" * 501,
               "\U0001F600" * 125, "\U0001F600" * 126, "\u202eevil", "%s%n%x", "' OR 1=1 --", "x" * 5000)


def image_ids() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_IDS), st.sampled_from([i for i, _ in index_pool()]),
                     st.text(max_size=40), st.text(min_size=120, max_size=260))


def segment_ids() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from((0, 1, 2, 96, 97, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, UINT64_MAX)),
                     st.integers(0, UINT64_MAX), st.integers(1, 140))


def top_ks() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from((INT32_MIN, -1, 0, 1, 100, 101, INT32_MAX)), st.integers(INT32_MIN, INT32_MAX),
                     st.integers(0, 12))


def scores() -> st.SearchStrategy[float]:
    """float32 values for min_score, NaN and infinities included."""
    return st.one_of(st.sampled_from((0.0, -1.0, 1.0, 0.5, math.nan, math.inf, -math.inf, 1e-45)),
                     st.floats(width=32), st.floats(-1, 1, width=32))


def filters(labels: tuple[str, ...]) -> st.SearchStrategy[pb.Filter]:
    return st.builds(
        pb.Filter,
        labels=st.lists(st.one_of(st.sampled_from(labels or ("x",)), st.text(max_size=20)), max_size=4),
        exclude_image_ids=st.lists(image_ids(), max_size=4),
        min_area_fraction=st.one_of(st.floats(0, 1, width=32), st.floats(width=32), st.just(0.0)),
    )


# ---- calls -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One RPC as it goes on the wire. messages: serialized request(s) (a stream: any number);
    request: the message (a list for a stream), None for raw bytes; note: what the input is."""

    method: str
    messages: tuple[bytes, ...] = field(repr=False)
    request: object = field(default=None, repr=False)
    note: str = ""

    @classmethod
    def of(cls, method: str, request, note: str = "") -> Call:
        if isinstance(request, list):
            return cls(method, tuple(m.SerializeToString() for m in request), request, note)
        return cls(method, (request.SerializeToString(),), request, note)


@dataclass(frozen=True)
class Target:
    """What the strategies know of the server: its labels and model version."""

    labels: tuple[str, ...] = ()
    model_version: str = ""


@st.composite
def search_calls(draw, target: Target) -> Call:
    request = pb.SearchRequest(top_k=draw(top_ks()), min_score=draw(scores()), include_masks=draw(st.booleans()),
                               search_effort=draw(st.sampled_from((0,) * 6 + (INT32_MIN, -1, 1, 64, INT32_MAX))))
    if draw(st.booleans()):
        request.filter.CopyFrom(draw(filters(target.labels)))
    request.model_version = draw(st.sampled_from(("",) * 8 + (target.model_version, "0123456789abcdef", "\x00")))
    kind, note = draw(st.sampled_from(("region", "region", "segment_id", "none"))), ""
    if kind == "segment_id":
        request.segment_id = draw(segment_ids())
    elif kind == "region":
        image = draw(images())
        request.region.image.data = image.data
        request.region.image.image_id = draw(image_ids())
        request.region.region.CopyFrom(draw(regions(image.size)))
        note = image.name
    return Call.of("SearchSimilar", request, note)


@st.composite
def batch_calls(draw, target: Target) -> Call:
    """0..3 search requests in one SearchSimilarBatch (0: an empty batch, INVALID_ARGUMENT)."""
    queries = [draw(search_calls(target)) for _ in range(draw(st.integers(0, 3)))]
    request = pb.SearchBatchRequest(queries=[call.request for call in queries])
    return Call.of("SearchSimilarBatch", request, "; ".join(call.note for call in queries))


@st.composite
def segment_calls(draw) -> Call:
    image = draw(images())
    count = draw(st.one_of(st.just(0), st.sampled_from((INT32_MIN, -1, 1, 4, 16, 576, 577, 1025, INT32_MAX)),
                           st.integers(INT32_MIN, INT32_MAX)))
    request = pb.SegmentRequest(image=pb.Image(data=image.data, image_id=draw(image_ids())), num_segments=count)
    return Call.of("Segment", request, image.name)


@st.composite
def index_calls(draw) -> Call:
    """A stream of 0..4 images: pool images, undecodable ones, hostile ids and uris."""
    undecodable = [image for image in hostile_images() if image.size is None]
    messages = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            pool_id, data = draw(st.sampled_from(index_pool()))
            image_id = draw(st.one_of(st.just(pool_id), st.just(""), image_ids()))
        else:
            data, image_id = draw(st.sampled_from(undecodable)).data, draw(image_ids())
        uri = draw(st.one_of(st.just(""), st.sampled_from(HOSTILE_IDS), st.text(max_size=30)))
        messages.append(pb.IndexImageRequest(image=pb.Image(data=data, image_id=image_id), uri=uri))
    return Call.of("IndexImages", messages, f"{len(messages)} images")


def delete_calls() -> st.SearchStrategy[Call]:
    unheld = st.one_of(st.sampled_from((2 ** 50, 2 ** 63, UINT64_MAX)), st.integers(2 ** 50, UINT64_MAX))
    return st.tuples(st.lists(image_ids(), max_size=6), st.lists(unheld, max_size=3)).map(
        lambda ids: Call.of("DeleteImages", pb.DeleteImagesRequest(image_ids=ids[0], segment_ids=ids[1])))


def get_segment_calls() -> st.SearchStrategy[Call]:
    return segment_ids().map(lambda i: Call.of("GetSegment", pb.GetSegmentRequest(segment_id=i)))


@st.composite
def raw_calls(draw, target: Target) -> Call:
    """Bytes that may not parse: random, or a valid request's bytes mutated."""
    method = draw(st.sampled_from(sorted(METHODS)))
    if draw(st.booleans()):
        data = draw(st.binary(max_size=64))
    else:
        valid = draw(get_segment_calls() if method != "SearchSimilar" else search_calls(target))
        data = bytearray(valid.messages[0] if valid.messages else b"")
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            data = data[: draw(st.integers(0, len(data)))]
        data = bytes(data)
    count = draw(st.integers(0, 3)) if METHODS[method].client_streaming else 1
    return Call(method, (data,) * count, None, "raw bytes")


def calls(target: Target) -> st.SearchStrategy[Call]:
    """Any call, weighted towards the methods with the most to decode."""
    kinds = {"search": search_calls(target), "batch": batch_calls(target), "segment": segment_calls(),
             "get": get_segment_calls(),
             "index": index_calls(), "delete": delete_calls(),
             "info": st.just(Call.of("GetInfo", pb.GetInfoRequest())), "raw": raw_calls(target)}
    weighted = ["search"] * 7 + ["batch"] * 2 + ["segment"] * 3 + ["get", "get", "index", "index", "delete", "delete", "info"] \
        + ["raw"] * 3
    return st.sampled_from(weighted).flatmap(kinds.__getitem__)


# ---- sending and judging -------------------------------------------------------------------

@dataclass
class Outcome:
    code: str
    details: str
    response: object | None
    seconds: float


class FuzzClient:
    """Sends `Call`s as raw bytes on one channel; responses are parsed with the proto."""

    def __init__(self, address: str, metadata: tuple = (), credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 64 << 20):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials
                        else grpc.insecure_channel(address, options=options))
        self.metadata = metadata
        self._stubs = {}
        for name, method in METHODS.items():
            path = f"/{SERVICE.full_name}/{name}"
            parse = getattr(pb, method.output_type.name).FromString
            make = self.channel.stream_unary if method.client_streaming else self.channel.unary_unary
            self._stubs[name] = make(path, request_serializer=None, response_deserializer=parse)

    def send(self, call: Call, timeout: float) -> Outcome:
        started = time.monotonic()
        stub = self._stubs[call.method]
        request = iter(call.messages) if METHODS[call.method].client_streaming else call.messages[0]
        try:
            response = stub(request, timeout=timeout, metadata=self.metadata)
            return Outcome("OK", "", response, time.monotonic() - started)
        except grpc.RpcError as error:
            return Outcome(error.code().name, error.details() or "", None, time.monotonic() - started)

    def close(self) -> None:
        self.channel.close()


def violations(call: Call, outcome: Outcome, max_top_k: int = 100) -> list[str]:
    """What in `outcome` breaks the contract for `call` (empty: nothing)."""
    if outcome.code not in ALLOWED_CODES[call.method]:
        return [f"{call.method} ({call.note}) answered {outcome.code}: {outcome.details[:300]}"]
    if call.method == "SearchSimilar" and call.request is not None:
        return _search_violations(call.request, outcome, max_top_k)
    if call.method == "SearchSimilarBatch" and call.request is not None:
        return _batch_violations(call.request, outcome, max_top_k)
    return []


def _batch_violations(request: pb.SearchBatchRequest, outcome: Outcome, max_top_k: int) -> list[str]:
    """An empty batch is INVALID_ARGUMENT; an OK batch answers each query as SearchSimilar would."""
    queries = list(request.queries)
    if not queries:
        return [] if outcome.code == "INVALID_ARGUMENT" else [f"an empty batch answered {outcome.code}"]
    if outcome.code != "OK":
        return []  # which query failed first decides the code; each query's own check is below
    results = list(outcome.response.results)
    if len(results) != len(queries):
        return [f"{len(results)} results for {len(queries)} queries"]
    return [f"queries[{n}]: {problem}" for n, (query, result) in enumerate(zip(queries, results))
            for problem in _search_violations(query, Outcome("OK", "", result, 0.0), max_top_k)]


def _search_violations(request: pb.SearchRequest, outcome: Outcome, max_top_k: int) -> list[str]:
    """The status the request's own fields decide, and an OK response's hits against the request."""
    found, f = [], request.filter
    if request.model_version:
        expected = None  # the version check comes first; its outcome depends on the server's version
    elif not 0 <= request.top_k <= max_top_k or math.isnan(request.min_score) \
            or not 0.0 <= f.min_area_fraction <= 1.0 or request.search_effort < 0:  # NaN fails the range check too
        expected = "INVALID_ARGUMENT"
    else:
        expected = None
    if expected and outcome.code != expected:
        found.append(f"expected {expected}, got {outcome.code}: {outcome.details[:200]}")
    if outcome.code != "OK":
        return found
    hits = list(outcome.response.hits)
    limit = request.top_k or min(10, max_top_k)
    if len(hits) > limit:
        found.append(f"{len(hits)} hits for top_k {request.top_k}")
    scores_ = [hit.score for hit in hits]
    if any(later > earlier + 1e-5 for earlier, later in itertools.pairwise(scores_)):
        found.append(f"hits are not best first: {scores_}")
    for hit in hits:
        if request.min_score != 0.0 and hit.score < request.min_score - 1e-5:
            found.append(f"hit {hit.segment_id} scores {hit.score} < min_score {request.min_score}")
        if f.labels and hit.label not in f.labels:
            found.append(f"hit {hit.segment_id} has label {hit.label!r} outside {list(f.labels)}")
        if hit.image_id in f.exclude_image_ids:
            found.append(f"hit {hit.segment_id} is from excluded image {hit.image_id!r}")
        if hit.area_fraction < f.min_area_fraction - 1e-6:
            found.append(f"hit {hit.segment_id} area {hit.area_fraction} < {f.min_area_fraction}")
        if bool(hit.mask_png) != request.include_masks:
            found.append(f"hit {hit.segment_id} mask present={bool(hit.mask_png)}, include_masks={request.include_masks}")
    return found


# ---- a run ---------------------------------------------------------------------------------

def warm_up(client) -> None:
    """One pass of a `SegsearchClient` over the expensive inputs, so that the server's RSS
    afterwards includes what any server holds after its first requests of each kind (model
    buffers, allocator pools, the pool images indexed): the baseline a run is measured from."""
    for image in hostile_images():
        for call, args in ((client.segment, (image.data,)), (client.search_box, (image.data, (0, 0, 1, 1)))):
            try:
                call(*args)
            except grpc.RpcError:
                pass
    client.index_images(list(index_pool()))


@dataclass
class FuzzReport:
    """requests: calls sent; codes: status name -> count; problems: contract violations."""

    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def record(self, call: Call, outcome: Outcome, max_top_k: int) -> list[str]:
        self.requests += 1
        self.codes[outcome.code] = self.codes.get(outcome.code, 0) + 1
        self.slowest = max(self.slowest, outcome.seconds)
        found = violations(call, outcome, max_top_k)
        self.problems.extend(found)
        return found


def fuzz(client: FuzzClient, target: Target, count: int, timeout: float = 20.0, fail_fast: bool = False,
         seed: int | None = None, max_top_k: int = 100) -> FuzzReport:
    """Send `count` generated calls one after the other; each gets `timeout` s (a hang shows as
    DEADLINE_EXCEEDED, a violation). fail_fast: raise at the first violation (hypothesis then
    shrinks the call to a minimal one); else collect every violation in the report."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    report = FuzzReport()

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=(Phase.generate, Phase.shrink) if fail_fast else (Phase.generate,), print_blob=fail_fast)
    @given(calls(target))
    def one(call: Call) -> None:
        found = report.record(call, client.send(call, timeout), max_top_k)
        if fail_fast and found:
            raise AssertionError("; ".join(found))

    (fixed_seed(seed)(one) if seed is not None else one)()
    return report
