"""Which H.264 packets no other frame needs: read from the NAL unit headers, without decoding.

A sampled read at 2 fps keeps about one frame in ten; the rest are decoded only because later frames reference
them. Non-reference pictures (``nal_ref_idc == 0``) are referenced by nothing, so a packet made only of them can be
left out of the decoder altogether: the decoded pixels of every other frame are unchanged (FFmpeg's own
``skip_frame=NONREF`` drops the same slices, but inside the decoder, which serialises its frame threads; leaving
the packets out lets two frame threads decode in parallel).

An IDR packet (``is_idr``) starts a closed group of pictures: decoding from it gives exactly the pixels of a
decode from the stream's start for it and every later frame, so a read can split there and decode the parts in
parallel. A keyframe that is not IDR (an open GOP's recovery point) carries no such promise of exact pixels.

A packet is droppable only when every NAL unit in it is a non-reference slice (types 1–4, ``nal_ref_idc`` 0),
an access-unit delimiter or filler data. SEI (which may persist past its picture), parameter sets, end-of-sequence
and any unknown type keep the packet. Anything unparsable keeps it too: the safe answer is always "decode".
"""

from __future__ import annotations

_SLICE_TYPES = frozenset({1, 2, 3, 4})  # non-IDR slice and its data partitions A/B/C (IDR, type 5, is a reference)
_HARMLESS_TYPES = frozenset({9, 12})  # access-unit delimiter, filler data


def nal_length_size(extradata: bytes | None) -> int | None:
    """The NAL length-prefix size of an ``avcC`` (MP4/MKV) stream, or None for Annex B (start codes) or unknown."""
    if extradata and len(extradata) >= 5 and extradata[0] == 1:
        return (extradata[4] & 0x03) + 1
    return None


def _headers_length_prefixed(data: bytes, length_size: int) -> list[int] | None:
    headers, i, n = [], 0, len(data)
    while i < n:
        if i + length_size > n:
            return None
        size = int.from_bytes(data[i : i + length_size], "big")
        i += length_size
        if size <= 0 or i + size > n:
            return None
        headers.append(data[i])
        i += size
    return headers


def _headers_annex_b(data: bytes) -> list[int] | None:
    headers, i = [], data.find(b"\x00\x00\x01")
    while i != -1:
        if i + 3 >= len(data):
            break
        headers.append(data[i + 3])
        i = data.find(b"\x00\x00\x01", i + 3)
    return headers or None


def _headers(data: bytes, length_size: int | None) -> list[int] | None:
    return _headers_length_prefixed(data, length_size) if length_size else _headers_annex_b(data)


def is_idr(data: bytes, length_size: int | None) -> bool:
    """Whether an H.264 packet holds an IDR slice (NAL type 5)."""
    return any(h & 0x1F == 5 and not h & 0x80 for h in _headers(data, length_size) or ())


def is_droppable(data: bytes, length_size: int | None) -> bool:
    """Whether an H.264 packet holds only non-reference slices (plus delimiters/filler): no frame refers to it."""
    headers = _headers(data, length_size)
    if not headers:
        return False
    has_slice = False
    for header in headers:
        if header & 0x80:  # forbidden_zero_bit: not a NAL header we understand
            return False
        nal_type, ref_idc = header & 0x1F, (header >> 5) & 0x03
        if nal_type in _SLICE_TYPES and ref_idc == 0:
            has_slice = True
        elif nal_type not in _HARMLESS_TYPES:
            return False
    return has_slice
