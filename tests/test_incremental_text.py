"""Incremental detokenisation (nosa.tokenizer.IncrementalDecoder) and the streamed text with stop strings
(nosa.serve.text.IncrementalText) equal decoding all ids at once, however the ids are split into pushes, and
each push decodes only a short window (decoding everything again at every token was O(n^2))."""

import pytest
from hypothesis import given, settings, strategies as st

from nosa.serve.text import IncrementalText
from nosa.tokenizer import ByteTokenizer, IncrementalDecoder, decode_text, first_stop

TOK = ByteTokenizer()
# Bytes of ASCII, of multi-byte characters and invalid ones (lone continuation bytes, truncated leads),
# and the special ids past the bytes (end of sequence, padding), which decode to nothing.
BYTE_IDS = st.one_of(st.integers(0x20, 0x7E), st.integers(0x80, 0xFF), st.sampled_from(list("é€😀ח".encode())),
                     st.integers(TOK.num_bytes, TOK.vocab_size - 1))


def _chunks(ids, cuts):
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(BYTE_IDS, max_size=60), cuts=st.lists(st.integers(0, 10 ** 6), max_size=20))
def test_the_decoded_text_equals_decoding_everything_at_once(ids, cuts):
    decoder = IncrementalDecoder(TOK)
    added = "".join(decoder.push(chunk) for chunk in _chunks(ids, cuts))
    added += decoder.push([], final=True)
    assert decoder.text == added == decode_text(TOK, ids)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab€é\x00", max_size=40), stops=st.lists(st.text(alphabet="ab€é", min_size=1, max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 10 ** 6), max_size=20))
def test_streamed_text_equals_the_whole_text_cut_at_the_first_stop_string(text, stops, cuts):
    ids = list(text.encode())
    whole = decode_text(TOK, ids)
    cut = min((i for i in (whole.find(s) for s in stops) if i >= 0), default=-1)
    expected = whole[:cut] if cut >= 0 else whole
    streamer = IncrementalText(TOK, stops)
    streamed = "".join(streamer.push(chunk) for chunk in _chunks(ids, cuts)) + streamer.push([], final=True)
    assert streamed == streamer.text == expected
    assert streamer.stopped == (cut >= 0)
    # Nothing streamed is ever part of a stop string that the text goes on to hold.
    for stop in stops:
        assert stop not in streamed


def test_each_push_decodes_a_short_window_however_long_the_text():
    calls = []

    class CountingTokenizer(ByteTokenizer):
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return super().decode(ids, **kw)

    ids = list(("x = 1 # café\n" * 400).encode())  # 5,600 bytes, multi-byte characters among them
    streamer = IncrementalText(CountingTokenizer(), ["never-there"])
    streamed = "".join(streamer.push([i]) for i in ids) + streamer.push([], final=True)
    assert streamed == "x = 1 # café\n" * 400
    assert max(calls) <= 4, max(calls)  # a window of at most the last two pushes' bytes and an unfinished é


def test_first_stop_only_looks_where_a_new_match_can_end():
    assert first_stop("abcab", ["ca"], searched=0) == 2
    assert first_stop("abcab", ["ca", "b"], searched=0) == 1
    # "ab" was searched before; a match ending past it starts at most len(stop) - 1 earlier
    assert first_stop("abcab", ["bc"], searched=2) == 1
    assert first_stop("abcab", ["ab"], searched=3) == 3


def _hf_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "foo": 4, ",": 5, "é": 6}
    wordlevel = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    # SentencePiece-style: '▁' marks a word's start and the decoder drops the text's leading space, so a
    # token renders differently at the start of a text than after another (what the window's context is for).
    pieces = {"<unk>": 0, "</s>": 1, "▁hello": 2, "▁world": 3, "lo": 4, "▁": 5, "é": 6, "x": 7}
    metaspace = Tokenizer(models.WordLevel(pieces, unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    return [PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>") for t in (wordlevel, metaspace)]


@pytest.mark.parametrize("index", [0, 1], ids=["wordlevel", "metaspace"])
def test_transformers_tokenizers_decode_incrementally_as_at_once(index):
    import random

    tokenizer = _hf_tokenizers()[index]
    rng = random.Random(index)
    for _ in range(200):
        ids = [rng.randrange(1, 8 if index else 7) for _ in range(rng.randrange(0, 12))]
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push([i]) for i in ids] + [decoder.push([], final=True)]
        assert "".join(pieces) == decoder.text == decode_text(tokenizer, ids), ids
