"""Streaming text never splits a character: CJK, emoji and accents arrive whole.

The tokenizer is the tiny checkpoint's real byte-level BPE (trained on English, so every
non-ASCII character spans several tokens); the oracle is its own `decode` of all the ids.
"""

from __future__ import annotations

import pytest

from reshard.runtime.text import TextCodec

TEXTS = [
    "sky 😀 blue é",
    "天空是蓝色的,因为瑞利散射。",
    "thumbs 👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "Ça coûte 5 € — naïve façade",
    "mixed: Why is the sky blue? 空 é 😀",
]


@pytest.fixture(scope="module")
def codec(tiny_dir) -> TextCodec:
    return TextCodec(tiny_dir)


def _old_stream(codec: TextCodec, ids: list[int]) -> str:
    """What `reshard run` printed before: the new suffix of each decode, complete or not."""
    printed, out = "", ""
    for n in range(1, len(ids) + 1):
        text = codec.decode(ids[:n])
        out += text[len(printed) :]
        printed = text
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode_with_no_broken_characters(codec, text):
    ids = codec.encode(text)
    assert len(ids) > len(text.split()), "each multi-byte character should span several tokens"
    stream = codec.stream()
    deltas = [stream.update(ids[:n]) for n in range(1, len(ids) + 1)]
    deltas.append(stream.flush())
    assert "".join(deltas) == codec.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas), deltas
    # The negative control: the old way garbles exactly these texts.
    assert "\ufffd" in _old_stream(codec, ids)


def test_an_incomplete_character_at_the_end_is_flushed_as_decode_shows_it(codec):
    ids = codec.encode("blue 😀")
    cut = ids[:-1]  # generation stopped inside the emoji's bytes
    stream = codec.stream()
    shown = "".join(stream.update(cut[:n]) for n in range(1, len(cut) + 1))
    assert "\ufffd" not in shown
    assert shown + stream.flush() == codec.decode(cut)
