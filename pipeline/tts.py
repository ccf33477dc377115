"""Offline text-to-speech with espeak-ng through a tiny ctypes binding.

The synthetic dataset needs spoken captions that a real ASR model (Whisper tiny.en) can transcribe, without any
network access. `espeakng-loader` ships libespeak-ng and its voice data inside a wheel; we call the C API
directly (no `phonemizer` dependency):

    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, buflength, data_path, 0) -> native sample rate (22050)
    espeak_SetSynthCallback(cb)     cb(short *wav, int numsamples, espeak_EVENT *events) collects samples
    espeak_SetVoiceByName("en"), espeak_SetParameter(espeakRATE, wpm, 0)
    espeak_Synth(text, ...)         returns once the whole utterance went through the callback

Determinism. libespeak-ng keeps wave-generator state in C statics that neither espeak_Terminate nor
espeak_Initialize reset (the pitch-flutter phase in wavegen.c, the AGC level, ...), so speaking the same text
twice in one process gives different samples (even different lengths). A freshly loaded library, however, is a
pure function of its inputs. So each utterance loads a private copy of the .so (a copy, so that another user of
libespeak-ng in this process -- e.g. phonemizer -- shares no state with us), initialises it, speaks, terminates
and unloads it with dlclose. That costs ~10 ms per utterance and makes same text -> same samples.
libespeak-ng is not thread-safe, so everything runs under one lock.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import tempfile
import threading

import numpy as np

from avcache.pipeline.media import resample

__all__ = ["TTSUnavailable", "available", "synthesize"]

# espeak-ng enums and flags (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class TTSUnavailable(RuntimeError):
    """espeak-ng could not be loaded or initialised in this process."""


_lock = threading.Lock()
_paths: tuple[str, bytes] | None = None  # (private library copy, data path)
_paths_error: TTSUnavailable | None = None


def _library_paths() -> tuple[str, bytes]:
    """Locate libespeak-ng and its data once, and make the private copy that each utterance loads."""
    global _paths, _paths_error
    if _paths is not None and not os.path.isfile(_paths[0]):
        _paths = None  # the temp copy vanished (e.g. a forked child outlived its parent's atexit cleanup)
    if _paths is None and _paths_error is None:
        try:
            _paths = _make_private_copy()
        except TTSUnavailable as e:
            _paths_error = e
    if _paths_error is not None:
        raise _paths_error
    return _paths


def _make_private_copy() -> tuple[str, bytes]:
    try:
        import espeakng_loader
        src = espeakng_loader.get_library_path()
        data = espeakng_loader.get_data_path()
    except (ImportError, RuntimeError) as e:
        raise TTSUnavailable(f"espeakng-loader is not usable: {e}") from e
    if not os.path.isfile(src):
        raise TTSUnavailable(f"libespeak-ng not found at {src}")
    tmp = tempfile.mkdtemp(prefix="avcache-espeak-")
    atexit.register(shutil.rmtree, tmp, True)
    dst = os.path.join(tmp, "libespeak-ng-avcache.so")
    shutil.copyfile(src, dst)
    return dst, data.encode()


class _Utterance:
    """One load -> initialise -> speak -> terminate -> unload cycle of a private libespeak-ng."""

    def __init__(self, lib_path: str, data_path: bytes) -> None:
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise TTSUnavailable(f"cannot load libespeak-ng ({lib_path}): {e}") from e
        self._declare(self.lib)
        self.chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._collect)  # must outlive the synthesis call
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500, data_path, 0)
        if rate <= 0:
            self.close(terminate=False)
            raise TTSUnavailable(f"espeak_Initialize failed (returned {rate}) with data path {data_path!r}")
        self.rate = int(rate)
        self.lib.espeak_SetSynthCallback(self._cb)

    @staticmethod
    def _declare(lib: ctypes.CDLL) -> None:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        for name in ("espeak_SetVoiceByName", "espeak_SetParameter", "espeak_Synth", "espeak_Synchronize",
                     "espeak_Terminate"):
            getattr(lib, name).restype = ctypes.c_int

    def _collect(self, wav, n, events) -> int:
        if wav and n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def speak(self, text: str, voice: str, wpm: int, pitch: int, word_gap: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise TTSUnavailable(f"espeak-ng has no voice named {voice!r}")
        for param, value in ((_PARAM_RATE, wpm), (_PARAM_VOLUME, 100), (_PARAM_PITCH, pitch),
                             (_PARAM_RANGE, 50), (_PARAM_WORDGAP, word_gap)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        buf = text.encode("utf-8") + b"\0"
        err = self.lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        self.lib.espeak_Synchronize()
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err} for text {text!r}")
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0

    def close(self, terminate: bool = True) -> None:
        if terminate:
            self.lib.espeak_Terminate()
        handle = self.lib._handle
        del self.lib
        import _ctypes
        _ctypes.dlclose(handle)  # drop the C statics, so the next utterance starts from a clean library


def available() -> bool:
    """True when espeak-ng loads and initialises in this process."""
    with _lock:
        try:
            utt = _Utterance(*_library_paths())
            utt.close()
            return True
        except TTSUnavailable:
            return False


def synthesize(text: str, sample_rate: int = 16000, *, voice: str = "en", wpm: int = 150, pitch: int = 50,
               word_gap: int = 2) -> np.ndarray:
    """Speak `text`; returns mono float32 in [-1, 1] at `sample_rate`. Same arguments -> same samples.

    Defaults favour ASR: a slow rate (150 wpm; espeak's default is 175) and a short extra gap between words.
    Raises TTSUnavailable when espeak-ng cannot be used.
    """
    if not text or not text.strip():
        raise ValueError("synthesize() needs non-empty text")
    with _lock:
        utt = _Utterance(*_library_paths())
        try:
            audio = utt.speak(text, voice, wpm, pitch, word_gap)
            rate = utt.rate
        finally:
            utt.close()
    return resample(audio, rate, sample_rate)  # libswresample, the same resampler extraction uses
