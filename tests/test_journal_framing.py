"""The journal's framing in C gives the bytes of its Python reference, and refuses what it must.

``engine/journal/_framing.c`` is built by ``pip install -e .``; where it is not (for example
``KABONI_PURE_PYTHON=1``), the journal runs ``_frame_into_py`` and the C half is skipped.
"""

from __future__ import annotations

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from engine.journal._format import FRAME, FRAME_SIZE, GROUP_END
from engine.journal import _log

framing = pytest.importorskip("engine.journal._framing", reason="the C framing is not built")
frame_into = framing.frame_into


def test_the_journal_uses_the_c_framing_where_it_is_built():
    assert _log._frame_into is frame_into


records = st.lists(st.tuples(st.integers(1, 0x7F), st.booleans(), st.binary(max_size=300)), min_size=1, max_size=40)


@given(records, st.integers(0, 2**64 - 1 - 40), st.binary(max_size=50))
def test_c_and_python_frame_the_same_bytes(recs, first, prefix):
    kinds = bytes(kind | (GROUP_END if end else 0) for kind, end, _ in recs)
    payloads = [payload for _, _, payload in recs]
    in_c, in_python = bytearray(prefix), bytearray(prefix)
    assert frame_into(in_c, first, kinds, payloads, 300) == _log._frame_into_py(in_python, first, kinds, payloads, 300)
    assert in_c == in_python
    # and the frames are what docs/journal.md says
    offset = len(prefix)
    for seq, (kind, payload) in enumerate(zip(kinds, payloads), first):
        crc, length, got_seq, got_kind = FRAME.unpack_from(in_c, offset)
        assert (length, got_seq, got_kind) == (len(payload), seq, kind)
        assert in_c[offset + FRAME_SIZE:offset + FRAME_SIZE + length] == payload
        assert crc == crc32c(in_c[offset + 4:offset + FRAME_SIZE + length])
        offset += FRAME_SIZE + length
    assert offset == len(in_c)


def test_any_buffer_is_a_payload():
    payloads = [b"bytes", bytearray(b"bytearray"), memoryview(b"xxmemoryviewxx")[2:-2]]
    in_c, in_python = bytearray(), bytearray()
    frame_into(in_c, 7, b"\x02\x02\x82", payloads, 100)
    _log._frame_into_py(in_python, 7, b"\x02\x02\x82", payloads, 100)
    assert in_c == in_python


@pytest.mark.parametrize("frame", [frame_into, _log._frame_into_py], ids=["c", "python"])
def test_kinds_and_payloads_must_pair_up(frame):
    for kinds, payloads in ((b"\x82", [b"a", b"b"]), (b"\x82\x82", [b"a"]), (b"", [])):
        buf = bytearray(b"kept")
        with pytest.raises(ValueError, match="kinds for"):
            frame(buf, 1, kinds, payloads, 100)
        assert buf == b"kept"


@pytest.mark.parametrize("frame", [frame_into, _log._frame_into_py], ids=["c", "python"])
def test_a_payload_over_the_bound_is_refused_before_anything_is_framed(frame):
    buf = bytearray(b"kept")
    with pytest.raises(ValueError, match="a record of 11 bytes: recovery reads records of at most 10 bytes"):
        frame(buf, 1, b"\x02\x02\x82", [b"ok", b"x" * 11, b"ok"], 10)
    assert buf == b"kept"
    assert frame(buf, 1, b"\x82", [b"x" * 10], 10) == 27


def test_wrong_types_are_refused_and_change_nothing():
    buf = bytearray(b"kept")
    with pytest.raises(TypeError, match="bytearray"):
        frame_into(b"bytes", 1, b"\x82", [b"a"], 10)
    with pytest.raises(TypeError):
        frame_into(buf, 1, b"\x82", [12], 10)
    with pytest.raises(TypeError, match="kinds"):
        frame_into(buf, 1, [0x82], [b"a"], 10)
    with pytest.raises(TypeError, match="payloads"):
        frame_into(buf, 1, b"\x82", 12, 10)
    with pytest.raises(OverflowError):
        frame_into(buf, -1, b"\x82", [b"a"], 10)
    with pytest.raises(ValueError, match="max_payload"):
        frame_into(buf, 1, b"\x82", [b"a"], -1)
    with pytest.raises(TypeError, match="5 arguments"):
        frame_into(buf, 1, b"\x82", [b"a"])
    assert buf == b"kept"


def test_a_buffer_in_use_is_not_resized():
    buf = bytearray(b"kept")
    with memoryview(buf):
        with pytest.raises(BufferError):
            frame_into(buf, 1, b"\x82", [b"a"], 10)
    assert buf == b"kept"


def test_each_frame_is_checksummed_by_the_crc32c_package(monkeypatch):
    calls = []

    def counted(data):
        calls.append(bytes(data))
        return crc32c(data)

    monkeypatch.setattr(framing, "crc32c", counted)
    buf = bytearray()
    frame_into(buf, 1, b"\x02\x82", [b"fill", b"entry"], 100)
    assert calls == [bytes(buf[4:21]), bytes(buf[25:])]  # one call per frame, over all of it but its CRC


def test_a_failed_checksum_takes_the_frames_back(monkeypatch):
    def fails_on_the_second(data, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError
        return crc32c(data)

    monkeypatch.setattr(framing, "crc32c", fails_on_the_second)
    buf = bytearray(b"kept")
    with pytest.raises(MemoryError):
        frame_into(buf, 1, b"\x02\x02\x82", [b"a", b"b", b"c"], 100)
    assert buf == b"kept"


def test_seqs_past_the_top_are_refused():
    buf = bytearray()
    with pytest.raises(OverflowError, match="2\\*\\*64"):
        frame_into(buf, 2**64 - 2, b"\x82\x82\x82", [b"a", b"b", b"c"], 100)
    assert frame_into(buf, 2**64 - 1, b"\x82", [b"a"], 100) == 18
