"""CTC decoding: greedy and beam search (lexicon, ARPA LM) on hand-made log-prob matrices."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspeech.beam import BeamDecoder
from fedspeech.decoding import GreedyDecoder, greedy_decode, make_decoder
from fedspeech.hypothesis import Hypothesis, Word, join_hypotheses
from fedspeech.lm import read_arpa_vocab, write_arpa, write_lexicon
from fedspeech_features.text import CharTokenizer

TOK = CharTokenizer()
SHIFT = 0.03  # seconds per frame


def frames(spec: list[str | dict[str, float]]) -> torch.Tensor:
    """``(T, V)`` log-probs: each item is a character ('-' = blank) at p=0.9, or a distribution.

    The probability left over is spread evenly over the other symbols.
    """
    rows = []
    for item in spec:
        dist = {item: 0.9} if isinstance(item, str) else item
        others = TOK.vocab_size - len(dist)
        row = torch.full((TOK.vocab_size,), max(1.0 - sum(dist.values()), 1e-6) / others)
        for ch, p in dist.items():
            row[0 if ch == "-" else TOK.alphabet.index(ch)] = p
        rows.append(row / row.sum())
    return torch.stack(rows).log()  # (T, V)


def spans(hyp: Hypothesis) -> list[tuple[str, float, float]]:
    return [(w.text, round(w.start_s, 3), round(w.end_s, 3)) for w in hyp.words]


# ---------------------------------------------------------------------- greedy
def test_greedy_collapses_repeats_drops_blanks_and_times_words() -> None:
    # Prepare: "hello world" with a doubled l kept apart by a blank, repeats and a long space
    lp = frames([*"-hhe-ll-llo", " ", " ", *"-w-oorld--"])

    # Execute
    hyp = greedy_decode(lp, TOK, SHIFT)

    # Assert: "hello" spans frames 1-10 (h first, o last), "world" frames 14-20
    assert hyp.text == "hello world"
    assert spans(hyp) == [("hello", 0.03, 0.33), ("world", 0.42, 0.63)]
    # each character is emitted at p=0.9
    assert all(w.confidence == pytest.approx(0.9) for w in hyp.words)
    assert hyp.confidence == pytest.approx(0.9)


def test_greedy_without_speech_is_empty_with_blank_confidence() -> None:
    hyp = greedy_decode(frames([{"-": 0.7, "a": 0.3}] * 5), TOK, SHIFT)
    assert hyp.text == "" and hyp.words == []
    assert hyp.confidence == pytest.approx(0.7, abs=1e-5)


def test_greedy_ignores_leading_trailing_and_repeated_spaces() -> None:
    hyp = greedy_decode(frames([" ", "a", "-", " ", "-", " ", "b", " "]), TOK, SHIFT)
    assert [w.text for w in hyp.words] == ["a", "b"] and hyp.text == "a b"


def test_blank_bias_trades_inserted_characters_for_blanks() -> None:
    # Prepare: "ab" where b's frame has blank close behind it (0.5 against 0.4)
    lp = frames(["-", "a", "-", {"b": 0.5, "-": 0.4}, "-"])
    # Execute / Assert: 0 is plain best path; a bias past log(0.5/0.4) turns b's frame blank
    assert GreedyDecoder(TOK, SHIFT).decode_batch(lp[None], torch.tensor([5]))[0].text == "ab"
    plain = GreedyDecoder(TOK, SHIFT, blank_bias=0.0).decode_batch(lp[None], torch.tensor([5]))
    assert plain[0].text == "ab"
    small = GreedyDecoder(TOK, SHIFT, blank_bias=0.2).decode_batch(lp[None], torch.tensor([5]))
    assert small[0].text == "ab"  # log(0.5/0.4) = 0.22 > 0.2
    biased = GreedyDecoder(TOK, SHIFT, blank_bias=0.3).decode_batch(lp[None], torch.tensor([5]))
    assert biased[0].text == "a"
    # the confident a keeps its own posterior: the bias moves the choice, not the confidence
    assert biased[0].words[0].confidence == pytest.approx(0.9)
    # a negative bias emits where plain decoding would not
    lp2 = frames(["-", {"-": 0.5, "c": 0.4}, "-"])
    assert greedy_decode(lp2, TOK, SHIFT).text == ""
    neg = GreedyDecoder(TOK, SHIFT, blank_bias=-0.3).decode_batch(lp2[None], torch.tensor([3]))
    assert neg[0].text == "c"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10.5, -11, True, "1"])
def test_a_bad_blank_bias_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="blank bias must be a number"):
        GreedyDecoder(TOK, SHIFT, blank_bias=bad)  # type: ignore[arg-type]


def test_blank_bias_is_for_greedy_decoding_only() -> None:
    assert make_decoder(TOK, SHIFT, blank_bias=1.0).blank_bias == 1.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="greedy decoding only"):
        make_decoder(TOK, SHIFT, beam_size=4, blank_bias=1.0)


def test_greedy_batch_equals_one_by_one_and_ignores_padding() -> None:
    # Prepare: two utterances, the shorter padded with frames that would decode to "z"
    a, b = frames([*"-ab-c"]), frames([*"x-y"])
    padded = torch.stack([a, torch.cat([b, frames([*"zz"])])])  # (2, 5, V)

    # Execute
    batch = GreedyDecoder(TOK, SHIFT).decode_batch(padded, torch.tensor([5, 3]))

    # Assert
    assert batch == [greedy_decode(a, TOK, SHIFT), greedy_decode(b, TOK, SHIFT)]
    assert batch[1].text == "xy"


def _reference_collapse(ids: list[int]) -> str:
    """Textbook CTC collapse: merge repeats, drop blanks, normalise spaces."""
    text = "".join(TOK.alphabet[k] for k, _ in itertools.groupby(ids) if k != 0)
    return " ".join(text.split())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_greedy_matches_textbook_collapse(ids: list[int]) -> None:
    # Prepare: a one-hot path over blank, space, apostrophe and a-d
    lp = torch.nn.functional.one_hot(torch.tensor(ids), TOK.vocab_size).float().mul(5)
    lp = lp.log_softmax(-1)  # (T, V)

    # Execute
    hyp = greedy_decode(lp, TOK, SHIFT)

    # Assert: same text; word spans ordered, non-overlapping and inside the utterance
    assert hyp.text == _reference_collapse(ids)
    ends = [0.0] + [t for w in hyp.words for t in (w.start_s, w.end_s)] + [len(ids) * SHIFT]
    assert ends == sorted(ends)
    assert 0.0 <= hyp.confidence <= 1.0


def test_shifted_and_joined_hypotheses() -> None:
    first = Hypothesis("ab", [Word("ab", 0.1, 0.3, 0.5)], 0.5)
    second = Hypothesis("c", [Word("c", 0.0, 0.1, 1.0)], 1.0).shifted(20.0)
    silent = Hypothesis("", [], 0.9)

    joined = join_hypotheses([first, silent, second])

    assert joined.text == "ab c"
    assert spans(joined) == [("ab", 0.1, 0.3), ("c", 20.0, 20.1)]
    assert joined.confidence == pytest.approx((0.5 * 2 + 1.0) / 3)  # character-weighted
    assert join_hypotheses([silent]).text == "" and join_hypotheses([silent]).confidence == 0.9
    assert join_hypotheses([]).confidence is None  # nothing decoded: no confidence to report


# ---------------------------------------------------------------------- beam search
def test_beam_lexicon_free_agrees_with_greedy_on_clear_input() -> None:
    # flashlight's timesteps are one frame ahead of the emissions: the times must still match
    lp = frames([*"-hhe-ll-llo", " ", *"-w-oorld--"])

    hyp = BeamDecoder(TOK, SHIFT, beam_size=8).decode(lp)

    assert hyp == greedy_decode(lp, TOK, SHIFT)


def test_beam_with_lexicon_only_outputs_lexicon_words(tmp_path: Path) -> None:
    # Prepare: the acoustics favour "kat" slightly, but only "cat" is a word
    lp = frames([*"-the-", " ", {"k": 0.5, "c": 0.4, "-": 0.1}, *"at-"])
    lexicon = tmp_path / "lexicon.txt"
    write_lexicon(["the", "cat", "sat", "the"], lexicon, TOK)  # duplicates dropped

    # Execute
    free = BeamDecoder(TOK, SHIFT, beam_size=10).decode(lp)
    restricted = BeamDecoder(TOK, SHIFT, beam_size=10, lexicon=lexicon).decode(lp)

    # Assert
    assert lexicon.read_text().splitlines() == ["the\tt h e", "cat\tc a t", "sat\ts a t"]
    assert free.text == "the kat"
    assert restricted.text == "the cat"
    assert [w.start_s for w in restricted.words] == [w.start_s for w in free.words]


def test_arpa_language_model_changes_the_result(tmp_path: Path) -> None:
    # Prepare: "kat" and "cat" are both words; the acoustics prefer "kat", the LM "cat"
    lp = frames([*"-the-", " ", {"k": 0.5, "c": 0.4, "-": 0.1}, *"at-"])
    lexicon, lm = tmp_path / "lexicon.txt", tmp_path / "lm.arpa"
    write_lexicon(["the", "cat", "kat", "sat"], lexicon, TOK)
    write_arpa(["the cat sat"] * 5 + ["a kat"], lm, order=2)

    # Execute
    no_lm = BeamDecoder(TOK, SHIFT, beam_size=10, lexicon=lexicon).decode(lp)
    with_lm = BeamDecoder(TOK, SHIFT, beam_size=10, lexicon=lexicon, lm=lm, lm_weight=1.0)
    lm_vocab_only = BeamDecoder(TOK, SHIFT, beam_size=10, lm=lm, lm_weight=1.0)  # ARPA unigrams

    # Assert
    assert no_lm.text == "the kat"
    assert with_lm.decode(lp).text == "the cat"
    assert lm_vocab_only.decode(lp).text == "the cat"


def test_beam_decoder_refuses_bad_inputs(tmp_path: Path) -> None:
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\n\0\0\0")
    with pytest.raises(ValueError, match="binary KenLM needs a lexicon"):
        BeamDecoder(TOK, SHIFT, lm=binary)
    (tmp_path / "bad.arpa").write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1 a\n")
    with pytest.raises(ValueError, match="cannot load the language model"):
        BeamDecoder(TOK, SHIFT, lm=tmp_path / "bad.arpa")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.arpa"):
        BeamDecoder(TOK, SHIFT, lm=tmp_path / "nowhere.arpa")
    with pytest.raises(ValueError, match="beam size"):
        make_decoder(TOK, SHIFT, beam_size=-1)
    assert isinstance(make_decoder(TOK, SHIFT), GreedyDecoder)
    assert isinstance(make_decoder(TOK, SHIFT, beam_size=4), BeamDecoder)


def test_beam_batch_handles_padding() -> None:
    a, b = frames([*"-ab-c"]), frames([*"x-y"])
    padded = torch.stack([a, torch.cat([b, frames([*"zzz"])[:2]])])  # (2, 5, V)

    out = BeamDecoder(TOK, SHIFT, beam_size=4).decode_batch(padded, torch.tensor([5, 3]))

    assert [h.text for h in out] == ["abc", "xy"]


@pytest.mark.parametrize("seed", range(5))
def test_beam_with_lm_times_every_word_on_noisy_input(tmp_path: Path, seed: int) -> None:
    # Prepare: peaky random posteriors (like an untrained model's) and a small word LM
    gen = torch.Generator().manual_seed(seed)
    lp = (3 * torch.randn(200, TOK.vocab_size, generator=gen)).log_softmax(-1)  # (T, V)
    lm = write_arpa(["all is well", "a little tall wall", "tell all"], tmp_path / "lm.arpa")

    # Execute
    hyp = BeamDecoder(TOK, SHIFT, beam_size=16, lm=lm, lm_weight=0.5).decode(lp)

    # Assert: LM words only, each timed inside the utterance, in order, without overlap
    assert hyp.words and hyp.text == " ".join(w.text for w in hyp.words)
    assert {w.text for w in hyp.words} <= set(read_arpa_vocab(lm))
    times = [t for w in hyp.words for t in (w.start_s, w.end_s)]
    assert times == sorted(times) and times[-1] <= 200 * SHIFT
    assert all(w.end_s > w.start_s and w.confidence > 0 for w in hyp.words)


def test_lexicon_without_spellable_words_is_refused(tmp_path: Path) -> None:
    (tmp_path / "lexicon.txt").write_text("日本\nÜber\n")
    with pytest.raises(ValueError, match="no words the alphabet can spell"):
        BeamDecoder(TOK, SHIFT, lexicon=tmp_path / "lexicon.txt")


# ---------------------------------------------------------------------- ARPA files
@pytest.mark.parametrize("order", [2, 3])
def test_write_arpa_is_a_normalised_model_kenlm_loads(tmp_path: Path, order: int) -> None:
    # Prepare
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import create_word_dict

    path = write_arpa(
        ["the cat sat on the mat", "the cat ran", "a dog sat"], tmp_path / "lm.arpa", order=order
    )
    vocab = [*read_arpa_vocab(path), "</s>", "<unk>"]
    words = create_word_dict({w: [[w]] for w in vocab})
    lm = KenLM(str(path), words)

    # Execute + Assert: after any context, P(next word) sums to one over the vocabulary
    for context in ([], ["the"], ["the", "cat"], ["zebra"]):
        state = lm.start(False)
        for w in context:
            state, _ = lm.score(state, words.get_index(w if w in vocab else "<unk>"))
        total = sum(
            10 ** (lm.finish(state)[1] if w == "</s>" else lm.score(state, words.get_index(w))[1])
            for w in vocab
        )
        assert total == pytest.approx(1.0, abs=1e-4), context
    assert read_arpa_vocab(path) == ["a", "cat", "dog", "mat", "on", "ran", "sat", "the"]


def test_write_arpa_counts_and_errors(tmp_path: Path) -> None:
    text = write_arpa(["a b", "a"], tmp_path / "lm.arpa").read_text()
    assert "ngram 1=5\nngram 2=4\n" in text  # <s> </s> <unk> a b; <s> a, a b, b </s>, a </s>
    assert f"{math.log10(1 / 4):.6f}\ta </s>" in text  # Witten-Bell: c=1 / (c(a)=2 + T(a)=2)
    with pytest.raises(ValueError, match="order must be >= 2"):
        write_arpa(["a"], tmp_path / "x.arpa", order=1)
    with pytest.raises(ValueError, match="no words"):
        write_arpa(["", "  "], tmp_path / "x.arpa")
    (tmp_path / "not.arpa").write_text("hello\n")
    with pytest.raises(ValueError, match="not an ARPA"):
        read_arpa_vocab(tmp_path / "not.arpa")
