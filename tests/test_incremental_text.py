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


def _first_to_complete(text, stops):
    """The oracle: grow the text one character at a time; the first stop string to appear as a suffix ends
    it (the longest when several appear at once). Where it starts, or -1."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text.endswith(s, 0, end)]
        if ending:
            return end - max(len(s) for s in ending)
    return -1


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
    cut = _first_to_complete(whole, stops)
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
    # The first to complete, not the first to start: "b" is whole before "abc" is (as when the text arrives
    # one byte at a time), so the answer does not depend on how many tokens a push brings.
    assert first_stop("abc", ["abc", "b"]) == 1
    assert first_stop("xabc", ["bc", "abc"]) == 1  # ending together: the longest


def test_overlapping_stop_strings_cut_the_same_however_the_text_arrives():
    for cuts in ([], [1], [1, 2], [2]):
        streamer = IncrementalText(TOK, ["b", "abc"])
        streamed = "".join(streamer.push(chunk) for chunk in _chunks(list(b"abcd"), cuts)) + streamer.push([], final=True)
        assert streamer.stopped and streamed == streamer.text == "a", cuts


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


def _cleanup_wordlevel(cleanup: bool):
    """A BERT-style tokenizer whose decode cleans up spaces across tokens: "it ' s" -> "it's"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "</s>": 1, "a": 2, "'": 3, "b": 4, ".": 5, "s": 6, "n't": 7, "do": 8, "n": 9, "t": 10}
    inner = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=cleanup)


def _byte_fallback_llama_style():
    """SentencePiece BPE with byte fallback (Llama 2's decoder): a run of byte ids is decoded as a unit, and
    an invalid run turns valid bytes before it into U+FFFD too."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁hello", "lo", "x", "é", ".", "STOP"]:
        vocab[piece] = len(vocab)
    inner = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _sequence(stop, max_tokens=64):
    import torch

    from nosa.engine.sampling import SamplingParams
    from nosa.engine.sequence import Sequence

    return Sequence(0, None, [1], SamplingParams(max_tokens=max_tokens, stop=stop), torch.device("cpu"), False)


def test_a_tokenizer_that_cleans_up_spaces_gives_the_text_of_decoding_everything_at_once():
    """The window's context rendered "it '" where the whole text reads "it's": with stop strings the engine's
    text was "a ' s" against "a's" without them, and the stream lost the "s"."""
    import random

    rng = random.Random(0)
    tokenizer = _cleanup_wordlevel(True)
    assert decode_text(tokenizer, [2, 3, 6]) == "a's"
    for trial in range(400):
        # "do n ' t" -> "don't": the clean-up reaches back two tokens
        ids = [8, 9, 3, 10] if trial == 0 else [rng.randrange(2, 11) for _ in range(rng.randrange(1, 12))]
        whole = decode_text(tokenizer, ids)
        seq = _sequence(["zzz"], max_tokens=len(ids))
        for token in ids:
            seq.append(token, None, {1}, tokenizer)
        assert seq.finished and seq.text == whole, ids
        streamer = IncrementalText(tokenizer, [])
        streamed = "".join(streamer.push([i]) for i in ids) + streamer.push([], final=True)
        assert streamed == streamer.text == whole, ids


def test_a_byte_fallback_decoder_ends_with_the_whole_decode():
    import random

    rng = random.Random(1)
    tokenizer = _byte_fallback_llama_style()
    size = len(tokenizer)
    characters = [list(c.encode()) for c in ("é", "€", "😀", "A", "\n")]
    for trial in range(400):
        if trial % 2:  # anything, invalid byte runs included: the final text is exact
            ids = [rng.randrange(3, size) for _ in range(rng.randrange(0, 14))]
        else:  # whole characters as byte ids among pieces: exact as it streams, too
            ids = []
            for _ in range(rng.randrange(0, 8)):
                ids += [rng.randrange(259, size)] if rng.random() < 0.5 else [3 + b for b in rng.choice(characters)]
        decoder = IncrementalDecoder(tokenizer)
        added = "".join(decoder.push([i]) for i in ids) + decoder.push([], final=True)
        assert decoder.text == decode_text(tokenizer, ids), ids
        if trial % 2 == 0:
            assert added == decoder.text and not decoder.rewritten, ids


def test_a_stop_string_is_seen_in_the_token_that_completes_it_when_that_token_starts_a_character():
    """"STOP" + the first byte of "€" in one token: the text waited for the character before settling, and
    the stop string was seen one token late (one token more generated than the stop allows)."""
    tokenizer = ByteTokenizer()

    class Multibyte(ByteTokenizer):  # id 300: the bytes of "STOP" and 0xE2; 301: 0x82 0xAC
        @property
        def vocab_size(self):
            return 302

        def decode(self, ids, skip_special_tokens=True):
            raw = bytearray()
            for i in ids:
                raw += b"STOP\xe2" if i == 300 else b"\x82\xac" if i == 301 else bytes([i]) if i < 256 else b""
            return raw.decode("utf-8", errors="replace")

    tokenizer = Multibyte()
    seq = _sequence(["STOP"])
    seq.append(ord("x"), None, {258}, tokenizer)
    assert not seq.finished
    seq.append(300, None, {258}, tokenizer)
    assert seq.finished and seq.finish_reason == "stop" and seq.text == "x"
    streamer = IncrementalText(tokenizer, ["STOP"])
    assert streamer.push([ord("x")]) == "x"
    assert streamer.push([300]) == "" and streamer.stopped and streamer.text == "x"


def test_a_window_that_never_settles_stops_growing():
    """A lone lead byte followed by ids that add no text kept every id in the window: each push decoded them
    all again."""
    sizes = []

    class Counting(ByteTokenizer):
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return super().decode(ids, **kw)

    decoder = IncrementalDecoder(Counting(), max_unsettled=8)
    for token in [0xE2] + [TOK.pad_token_id] * 200:
        decoder.push([token])
    assert max(sizes) <= 2 * 8 + 1, max(sizes)
    decoder.push([], final=True)
    assert decoder.text == "\ufffd"


def test_a_failed_request_with_stop_strings_keeps_its_unfinished_character():
    seq = _sequence(["zz"])
    for token in [ord("a"), 0xC3]:
        seq.append(token, None, {258}, TOK)
    seq.fail("boom")
    assert seq.finish_reason == "error" and seq.text == "a\ufffd" == decode_text(TOK, seq.output_token_ids)


def test_a_stop_string_after_pending_text_longer_than_it_is_cut_where_it_begins():
    """find_stop searched from past the settled text's end when the pending text was longer than the stop
    and unchanged: the cut came out too late and the stop string stayed in the text."""
    streamer = IncrementalText(TOK, ["b"])
    pieces = [streamer.push(list(b"a\xe2")), streamer.push(list(b"\x82\xacb\xc3")), streamer.push(list(b"\xa9"), final=True)]
    assert streamer.stopped and streamer.text == "".join(pieces) == "a€"

    class Multibyte(ByteTokenizer):  # 300: b"ab" + a lead byte; 301: the rest of "€", "cd", a lead byte
        def decode(self, ids, skip_special_tokens=True):
            raw = b"".join(b"ab\xe2" if i == 300 else b"\x82\xaccd\xe2" if i == 301 else bytes([i]) for i in ids)
            return raw.decode("utf-8", errors="replace")

    seq = _sequence(["d"])
    for token in (300, 301):
        seq.append(token, None, {258}, Multibyte())
    assert seq.finish_reason == "stop" and seq.text == "ab€c"


def test_a_context_that_renders_as_nothing_does_not_hide_a_rewrite():
    """A space byte the decoder strips at a text's start made the window's context "", which every window
    starts with: 'é ��' was kept where the whole decode reads 'é��x' (an invalid byte run after the space
    turns it into U+FFFD too)."""
    tokenizer = _byte_fallback_llama_style()
    ids = [263, 3 + 0x20, 3 + 0xC3, 262]  # é, <0x20>, <0xC3>, x
    assert decode_text(tokenizer, ids) == "é\ufffd\ufffdx"
    seq = _sequence(["x"])
    for token in ids:
        seq.append(token, None, {2}, tokenizer)
    assert seq.finish_reason == "stop" and seq.text == "é\ufffd\ufffd"
    streamer = IncrementalText(tokenizer, ["x"])
    for token in ids:
        streamer.push([token])
    assert streamer.stopped and streamer.text == "é\ufffd\ufffd"


def test_byte_fallback_text_costs_about_the_same_per_token_however_long():
    """Adjacent characters spelt in byte ids decoded everything again at each of their bytes: O(n^2)."""
    tokenizer = _byte_fallback_llama_style()
    per_token = []
    for reps in (50, 200):  # every character here, the space too, is byte ids: one long byte run
        ids = tokenizer.encode("日本語 " * reps, add_special_tokens=False)
        sizes = []

        class Counting(type(tokenizer)):
            def decode(self, token_ids, *args, **kwargs):
                sizes.append(len(token_ids))
                return super().decode(token_ids, *args, **kwargs)

        tokenizer.__class__ = Counting
        try:
            streamer = IncrementalText(tokenizer, ["never"])
            for token in ids:
                streamer.push([token])
            streamer.push([], final=True)
        finally:
            tokenizer.__class__ = Counting.__mro__[1]
        assert streamer.text == decode_text(tokenizer, ids)
        per_token.append(sum(sizes) / len(ids))
    assert per_token[1] < 1.5 * per_token[0], per_token


def test_the_clean_up_flag_means_whole_decodes_only_where_transformers_applies_it():
    """transformers 5 ignores clean_up_tokenization_spaces for BPE models: such a tokenizer was decoded whole
    at every token for nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nosa.tokenizer import _rewrites_across_tokens

    vocab = {"a": 0, "b": 1, "<e>": 2}
    bpe = Tokenizer(models.BPE(vocab, []))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    flagged_bpe = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<e>", clean_up_tokenization_spaces=True)
    assert _rewrites_across_tokens(flagged_bpe) is not hasattr(flagged_bpe, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    assert _rewrites_across_tokens(_cleanup_wordlevel(True)) and not _rewrites_across_tokens(_cleanup_wordlevel(False))


def test_a_stop_string_completed_only_by_the_final_settle_still_cuts_the_text():
    seq = _sequence(["a\ufffd"], max_tokens=2)
    for token in (ord("a"), 0xE2):
        seq.append(token, None, {258}, TOK)
    assert seq.finished and seq.finish_reason == "stop" and seq.text == ""
