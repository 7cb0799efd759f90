"""CTC beam search through torchaudio's ``ctc_decoder`` (flashlight-text): lexicon, KenLM LM.

Returns the same :class:`~fedspeech.hypothesis.Hypothesis` as greedy decoding, with word times
read off the beam's token path.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchaudio.models.decoder import CTCHypothesis, ctc_decoder

from fedspeech.hypothesis import (
    Hypothesis,
    Word,
    char_weighted_confidence,
    hypothesis_from_path,
    mean_blank_posterior,
)
from fedspeech.lm import is_binary_kenlm, read_arpa_vocab, read_lexicon, write_lexicon
from fedspeech_features.text import CharTokenizer

log = logging.getLogger(__name__)

# flashlight's name for the word boundary ("silence") token; our tokenizer spells it " ".
SIL_TOKEN = "|"


class BeamDecoder:
    """CTC beam search with torchaudio's ``ctc_decoder`` (flashlight-text), optional lexicon + LM.

    Args:
        tokenizer: the model's tokenizer; its space becomes flashlight's word boundary ``|``.
        frame_shift_s: seconds between frames.
        beam_size: hypotheses kept per frame.
        lexicon: word list or flashlight lexicon (``word c h a r s`` lines; only the first
            column is read, spellings come from the characters) restricting the output to those
            words, or None for lexicon-free decoding (any character sequence). Words with
            characters outside the alphabet are left out with a warning.
        lm: KenLM word language model, ARPA text or KenLM binary. Without ``lexicon``, the
            lexicon is the ARPA's unigram list (a binary LM needs an explicit ``lexicon``).
        lm_weight: weight of the LM score against the acoustic score.
        word_score: score added per word (positive favours more, shorter words).
        beam_threshold: prune hypotheses this far below the best.
        log_add: merge paths of the same prefix by log-sum-exp (true CTC prefix scores) instead of
            max (Viterbi, flashlight's default).

    Raises:
        ValueError: the alphabet has no space or already uses ``|``, the lexicon (or the LM's
            unigrams) has no word the alphabet can spell, a binary LM has no lexicon, or KenLM
            cannot load the LM.
        FileNotFoundError: the lexicon or LM file does not exist.
    """

    def __init__(
        self,
        tokenizer: CharTokenizer,
        frame_shift_s: float,
        *,
        beam_size: int = 50,
        lexicon: str | Path | None = None,
        lm: str | Path | None = None,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        beam_threshold: float = 50.0,
        log_add: bool = False,
    ) -> None:
        if " " not in tokenizer.alphabet or SIL_TOKEN in tokenizer.alphabet:
            raise ValueError(f"beam search needs an alphabet with ' ' and without {SIL_TOKEN!r}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.tokenizer = tokenizer
        self.frame_shift_s = frame_shift_s
        tokens = [SIL_TOKEN if ch == " " else ch for ch in tokenizer.alphabet]
        for path in (lexicon, lm):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path}: file not found")
        with tempfile.TemporaryDirectory(prefix="fedspeech-lexicon-") as tmp:
            # flashlight reads both files while it is built: a temporary lexicon may go after.
            lexicon_file = self._checked_lexicon(lexicon, lm, Path(tmp) / "lexicon.txt")
            try:
                self._decoder = ctc_decoder(
                    lexicon=str(lexicon_file) if lexicon_file else None,
                    tokens=tokens,
                    lm=str(lm) if lm is not None else None,
                    beam_size=beam_size,
                    beam_threshold=beam_threshold,
                    lm_weight=lm_weight,
                    word_score=word_score,
                    log_add=log_add,
                    blank_token=tokenizer.alphabet[tokenizer.blank_id],
                    sil_token=SIL_TOKEN,
                )
            except RuntimeError as exc:  # KenLM's FormatLoadException and friends
                reason = str(exc).strip().splitlines()[-1][-200:]
                raise ValueError(f"{lm}: cannot load the language model ({reason})") from exc
        self._space_id = tokenizer.alphabet.index(" ")
        self._lexicon = lexicon is not None or lm is not None

    def _checked_lexicon(
        self, lexicon: str | Path | None, lm: str | Path | None, scratch: Path
    ) -> Path | None:
        """A lexicon file flashlight can read, validated against the alphabet (None: lexicon-free)."""
        if lexicon is not None:
            words = list(read_lexicon(lexicon, self.tokenizer))
        elif lm is not None:
            if is_binary_kenlm(lm):
                raise ValueError(f"{lm}: a binary KenLM needs a lexicon (--lexicon FILE)")
            # A word LM scores words; lexicon-free decoding would query it with characters.
            words = read_arpa_vocab(lm)
        else:
            return None
        written = write_lexicon(words, scratch, self.tokenizer)  # drops what it cannot spell
        if not written:
            raise ValueError(f"{lexicon or lm}: no words the alphabet can spell")
        log.info("beam search lexicon: %d words from %s", written, lexicon or lm)
        return scratch

    def _lexicon_hypothesis(
        self,
        hyp: CTCHypothesis,
        frames: list[int],
        emissions: Tensor,
        path: np.ndarray,
        blank_post: float,
    ) -> Hypothesis:
        """The decoded lexicon words, timed by the token path that spells them.

        flashlight's token path need not match its words letter for letter: words may follow
        each other without a boundary token, a doubled letter may show once, and the path may
        end in a partial word (``| n o r t h a n g e r | t |`` for ``["northanger"]``). The
        words are the result; the path is walked along their spellings to time them. A word the
        walk cannot place (not seen in tests) is timed at the end of the one before it, with
        confidence 0.
        """
        chars = [
            (tok, frame)
            for tok, frame in zip(hyp.tokens.tolist(), frames, strict=True)
            if tok not in (self._space_id, self.tokenizer.blank_id)
        ]
        tokens: list[int] = []
        kept_frames: list[int] = []
        pos = placed = 0
        for word in hyp.words:
            group, prev = [], None
            for ch in word:
                if pos < len(chars) and self.tokenizer.alphabet[chars[pos][0]] == ch:
                    group.append(chars[pos])
                    pos += 1
                elif ch != prev:  # only a repeated letter may be missing from the path
                    group = []
                    break
                prev = ch
            if not group:
                log.debug("beam search: cannot time %r and the words after it", word)
                break
            if tokens:
                tokens.append(self._space_id)
                kept_frames.append(group[0][1])
            tokens += [tok for tok, _ in group]
            kept_frames += [frame for _, frame in group]
            placed += 1
        post = [float(emissions[f, t].exp()) for f, t in zip(kept_frames, tokens, strict=True)]
        timed = hypothesis_from_path(
            tokens, kept_frames, post, path, self.tokenizer, self.frame_shift_s, blank_post
        ).words
        end = timed[-1].end_s if timed else 0.0
        words = [replace(w, text=t) for w, t in zip(timed, hyp.words, strict=False)]
        words += [Word(t, end, end, 0.0) for t in hyp.words[placed:]]
        confidence = char_weighted_confidence(words) if words else blank_post
        return Hypothesis(" ".join(hyp.words), words, confidence)

    def decode(self, log_probs: Tensor) -> Hypothesis:
        """Decode one utterance's ``(T, V)`` log-probs."""
        return self.decode_batch(log_probs[None], torch.tensor([log_probs.shape[0]]))[0]

    def decode_batch(self, log_probs: Tensor, lengths: Tensor) -> list[Hypothesis]:
        """Decode ``(B, T, V)`` log-probs; frames at or past ``lengths[b]`` are ignored."""
        emissions = log_probs.detach().to("cpu", torch.float32).contiguous()  # (B, T, V)
        lengths = lengths.to("cpu", torch.int64)
        if emissions.shape[1] == 0:  # flashlight needs at least one frame
            return [Hypothesis("", [], 1.0) for _ in range(emissions.shape[0])]
        results = self._decoder(emissions, lengths)
        best_lp, best = emissions.max(dim=-1)  # (B, T), (B, T)
        best_post = best_lp.exp().numpy()  # (B, T)
        blank = self.tokenizer.blank_id
        out = []
        for b, n in enumerate(lengths.tolist()):
            hyp = results[b][0]
            path = best[b, :n].numpy()  # (T_b,) greedy labels, for run ends and blank posterior
            blank_post = mean_blank_posterior(path, best_post[b, :n], blank)
            tokens = hyp.tokens.tolist()
            # flashlight's path has one extra leading frame (its start state), so timesteps are
            # one ahead of the emission frames (checked in tests/test_decoding.py).
            frames = [min(max(int(t) - 1, 0), n - 1) for t in hyp.timesteps.tolist()]
            if self._lexicon:
                out.append(self._lexicon_hypothesis(hyp, frames, emissions[b], path, blank_post))
                continue
            post = [
                float(emissions[b, f, tok].exp()) for f, tok in zip(frames, tokens, strict=True)
            ]
            out.append(
                hypothesis_from_path(
                    tokens, frames, post, path, self.tokenizer, self.frame_shift_s, blank_post
                )
            )
        return out
