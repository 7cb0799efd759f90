"""Text-to-speech with libespeak-ng (from the ``espeakng-loader`` wheel) driven through ctypes.

libespeak-ng keeps its whole synthesizer state in process-global C variables (pitch flutter phase,
glottal and Klatt filter memories, echo buffer, random state), and neither ``espeak_Terminate`` nor
``espeak_Initialize`` resets all of it: measured here, the same text and voice synthesized twice in
one process differ for almost every voice and variant. :class:`Espeak` therefore gives each instance a
private copy of the shared library and loads a fresh image of it for every utterance (dlopen ->
synthesize -> dlclose), so the samples depend only on ``(text, voice)`` — not on what was spoken
before, nor on other users of libespeak-ng in the same process. The reload costs ~1.5 ms of the
~3.5 ms per short sentence.

>>> with Espeak() as tts:
...     samples, rate = tts.synthesize("hello world", Voice("en-us", "f3", rate=160, pitch=55))
>>> samples.dtype, rate
(dtype('int16'), 22050)
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

logger = logging.getLogger("fedspeech.tts")

# espeak_AUDIO_OUTPUT: samples are handed to our callback and espeak_Synth returns when done.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeakINITIALIZE_DONT_EXIT: report a missing data folder as an error instead of calling exit().
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # speak the clause's final pause: utterances end in a short natural silence
# espeak_PARAMETER ids (speak_lib.h).
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
# Measured on 300 corpus sentences: espeak's default volume 100 clips int16 in 4% of utterances;
# 70 was the loudest without clipping, 60 leaves headroom (peaks up to 0.84 of full scale).
_VOLUME_LEVEL = 60
_EE_NOT_FOUND = 2
_RAND_SEED = 1  # espeak's own noise generator (breath, whisper): fixed per utterance

# Parameter limits of espeak_SetParameter (speak_lib.h): rate 80..450 words/min, pitch/range 0..100.
RATE_LIMITS = (80, 450)
PITCH_LIMITS = (0, 100)

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class TtsError(RuntimeError):
    """Text-to-speech is unavailable (library or data missing) or a request is invalid."""


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice setting.

    Attributes:
        name: language voice, e.g. ``"en-us"``, ``"en"``, ``"en-gb-x-rp"``, ``"en-gb-scotland"``.
        variant: variant file in ``espeak-ng-data/voices/!v`` (``"f1"``..``"f5"``,
            ``"m1"``..``"m7"``, ``"klatt"``...), or ``None`` for the language default.
        rate: speaking rate in words per minute (80..450; espeak's default is 175).
        pitch: base pitch, 0..100 (50 = the variant's own).
        pitch_range: intonation range, 0..100 (0 = monotone, 50 = default).
    """

    name: str = "en-us"
    variant: str | None = None
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50

    def __post_init__(self) -> None:
        if not self.name or "+" in self.name:
            raise TtsError(f"voice name {self.name!r} must be a language voice without '+variant'")
        if self.variant is not None and (not self.variant or "/" in self.variant):
            raise TtsError(f"invalid voice variant {self.variant!r}")
        if not RATE_LIMITS[0] <= self.rate <= RATE_LIMITS[1]:
            raise TtsError(f"rate {self.rate} outside {RATE_LIMITS} words per minute")
        for what, value in (("pitch", self.pitch), ("pitch_range", self.pitch_range)):
            if not PITCH_LIMITS[0] <= value <= PITCH_LIMITS[1]:
                raise TtsError(f"{what} {value} outside {PITCH_LIMITS}")

    @property
    def espeak_name(self) -> str:
        """The name espeak_SetVoiceByName takes: ``language`` or ``language+variant``."""
        return self.name if self.variant is None else f"{self.name}+{self.variant}"


class Espeak:
    """libespeak-ng synthesizer. Use as a context manager, or call :meth:`open` / :meth:`close`.

    Each instance works on its own copy of the library (see the module docstring), so several
    instances may coexist in one process. One instance is not thread-safe.

    Args:
        library_path: libespeak-ng shared library; default: the ``espeakng-loader`` wheel's.
        data_path: ``espeak-ng-data`` folder; default: the ``espeakng-loader`` wheel's.
    """

    def __init__(
        self, library_path: str | Path | None = None, data_path: str | Path | None = None
    ) -> None:
        self._library_source = library_path
        self._data_source = data_path
        self._private_lib: Path | None = None
        self._data_path: Path | None = None
        self._sample_rate = 0
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)
        self._cleanup: weakref.finalize | None = None

    def __enter__(self) -> Espeak:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Locate the library and data, make the private library copy and check it initialises.

        Raises:
            TtsError: espeakng-loader, the library or the voice data is missing or unusable.
        """
        if self._private_lib is not None:
            return
        library, data = _locate(self._library_source, self._data_source)
        workdir = Path(tempfile.mkdtemp(prefix="fedspeech-espeak-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, workdir, True)
        self._private_lib = workdir / library.name
        self._data_path = data
        try:
            shutil.copyfile(library, self._private_lib)
            _unload(self._load())  # fails here, not mid-build, if the library is unusable
        except BaseException:
            self.close()
            raise
        logger.debug("espeak-ng %s ready (%d Hz)", library, self._sample_rate)

    def close(self) -> None:
        """Delete the private library copy. Safe to call twice."""
        if self._cleanup is not None:
            self._cleanup()
        self._cleanup = None
        self._private_lib = None

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz (22050 for espeak-ng's voices); known once opened."""
        self._require_open()
        return self._sample_rate

    def variants(self) -> list[str]:
        """Names of the voice variants in the data folder (``f1``, ``m3``, ``klatt``...), sorted."""
        self._require_open()
        assert self._data_path is not None
        folder = self._data_path / "voices" / "!v"
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    def check_voice(self, voice: Voice) -> None:
        """Raise TtsError unless espeak-ng knows ``voice``'s language and variant."""
        self._require_open()
        lib = self._load()
        try:
            self._select(lib, voice)
        finally:
            _unload(lib)

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, int]:
        """Speak ``text`` with ``voice``.

        The result is a pure function of ``(text, voice)`` and the library build.

        Returns:
            ``(samples, sample_rate)``: ``(N,)`` int16 mono samples and their rate in Hz.

        Raises:
            TtsError: empty text, unknown voice, or a synthesis error of the engine.
        """
        self._require_open()
        if not text.strip():
            raise TtsError("cannot synthesize empty text")
        encoded = text.encode("utf-8") + b"\0"
        lib = self._load()
        try:
            self._select(lib, voice)
            lib.espeak_ng_SetRandSeed(_RAND_SEED)
            self._chunks = []
            flags = _CHARS_UTF8 | _ENDPAUSE
            status = lib.espeak_Synth(
                encoded, len(encoded), 0, _POS_CHARACTER, 0, flags, None, None
            )
            lib.espeak_Synchronize()
            if status != 0:
                raise TtsError(f"espeak_Synth failed with status {status} for {text!r}")
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        finally:
            self._chunks = []
            _unload(lib)
        if samples.size == 0:
            raise TtsError(f"espeak-ng produced no audio for {text!r} ({voice.espeak_name})")
        return samples, self._sample_rate

    # ------------------------------------------------------------------ internals

    def _require_open(self) -> None:
        if self._private_lib is None:
            raise TtsError("Espeak is not open: use 'with Espeak() as tts:' or call open()")

    def _collect(self, wav: ctypes._Pointer, numsamples: int, events: int | None) -> int:
        # Runs inside espeak_Synth: copy the samples out (the buffer is reused) and continue (0).
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def _load(self) -> ctypes.CDLL:
        """dlopen a fresh image of the private library copy and initialise it."""
        assert self._private_lib is not None and self._data_path is not None
        try:
            lib = ctypes.CDLL(str(self._private_lib), mode=ctypes.RTLD_LOCAL)
        except OSError as exc:
            raise TtsError(
                f"cannot load libespeak-ng ({exc}; a noexec TMPDIR also causes this)"
            ) from exc
        _declare(lib)
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self._data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            _unload(lib)
            raise TtsError(f"espeak_Initialize failed ({rate}) with data folder {self._data_path}")
        self._sample_rate = int(rate)
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    def _select(self, lib: ctypes.CDLL, voice: Voice) -> None:
        assert self._data_path is not None
        # espeak silently ignores an unknown variant: check the file ourselves.
        if (
            voice.variant is not None
            and not (self._data_path / "voices" / "!v" / voice.variant).is_file()
        ):
            raise TtsError(f"unknown espeak-ng voice variant {voice.variant!r}")
        status = lib.espeak_SetVoiceByName(voice.espeak_name.encode())
        if status == _EE_NOT_FOUND:
            raise TtsError(f"unknown espeak-ng voice {voice.name!r}")
        if status != 0:
            raise TtsError(f"espeak_SetVoiceByName({voice.espeak_name!r}) failed ({status})")
        settings = (_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range)
        for param, value in (*settings, (_VOLUME, _VOLUME_LEVEL)):
            lib.espeak_SetParameter(param, value, 0)


def _locate(library: str | Path | None, data: str | Path | None) -> tuple[Path, Path]:
    if library is None or data is None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise TtsError("espeak-ng not available: pip install espeakng-loader") from exc
        try:
            library = library if library is not None else espeakng_loader.get_library_path()
            data = data if data is not None else espeakng_loader.get_data_path()
        except RuntimeError as exc:  # the loader raises RuntimeError when its data is missing
            raise TtsError(f"espeakng-loader is incomplete: {exc}") from exc
    library, data = Path(library), Path(data)
    if not library.is_file():
        raise TtsError(f"libespeak-ng not found at {library}")
    if not (data / "phondata").is_file():
        raise TtsError(f"{data} is not an espeak-ng-data folder (no phondata)")
    return library.resolve(), data.resolve()


def _declare(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int


def _unload(lib: ctypes.CDLL) -> None:
    # Terminate frees espeak's buffers; dlclose drops the last reference to the private copy, so
    # the next dlopen maps a fresh data segment (all synthesizer state back to its initial values).
    lib.espeak_Terminate()
    _ctypes.dlclose(lib._handle)
