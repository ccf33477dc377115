"""A small synthetic audio-visual dataset whose answers are known, written in the official on-disk layouts.

`write_synthetic(out_dir)` writes scenes of a few classes (dog, car, bird, ...). Every scene appears in three
datasets (a fourth with vggsound=True, a fifth with ln_coco=True), each laid out exactly like the published one
so that the real adapters read it unchanged:

    out_dir/
      avsd/Charades_v1_480/<ID>.mp4                 H.264 video + AAC 16 kHz mono audio (the class sound)
      avsd/{train,valid,test}_set4DSTC7-AVSD.json   {"type": "scene_aware_dialog", "dialogs": [...]}
      avsd/test_set4DSTC7-AVSD_multiref.json        test dialogs, last answer = list of reference answers
      avsd/Charades/Charades_v1_{train,test}.csv    Charades annotations: each video's actions with their times
      avsd/Charades/Charades_v1_classes.txt         "c000 Walking a dog" ... (the action vocabulary)
      flickr8k_audio/Flicker8k_Dataset/<stem>.jpg   (sic: the official folder name has the typo)
      flickr8k_audio/Flickr8k_text/Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt
      flickr8k_audio/flickr_audio/wavs/<stem>_<n>.wav, flickr_audio/wav2capt.txt
      esc50/meta/esc50.csv, esc50/audio/<fold>-<src>-<take>-<target>.wav   (5 s, 44.1 kHz like ESC-50)
      vggsound/vggsound.csv                         no header: youtube_id,start_seconds,label,split (train/test)
      vggsound/video/<youtube_id>_<start:06d>.mp4   each scene's AVSD video again, under a VGGSound clip name
                                                    (only with vggsound=True: see write_synthetic)
      ln_coco/coco_{train,val}_localized_narratives*.jsonl   Localized Narratives COCO: a narration per scene
      ln_coco/coco_{train,val}/coco_<split>_<image_id>_<annotator>.ogg   the narration spoken (Ogg Opus)
      ln_coco/{train,val}2017/<image_id:012d>.jpg   the scene's Flickr still under a COCO 2017 name
                                                    (only with ln_coco=True: see write_synthetic)
      classes.json                                  ground truth: class of every item, planted frames, ...

The class signal is deliberately strong and low-level (background colour, big shapes, tone bands and rhythms),
because tests train small heads on features of random-initialised tiny encoders and expect them to beat chance.
Everything derives from `seed`: text/JSON/WAV/JPEG files are byte-identical for the same seed, and so are the
Ogg Opus files (PyAV's libopus, +bitexact muxing) and the mp4 files (frames converted to YUV here,
single-threaded libx264 without mbtree, ffmpeg's AAC encoder, +bitexact muxing).
Spoken captions use espeak-ng (see tts.py) when it loads; Whisper tiny.en transcribes the class word in ~95 %
of them.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import time
import warnings
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import tts
from .datasets.ln_coco import image_name as coco_image_name
from .datasets.ln_coco import ln_coco_split
from .datasets.vggsound import clip_name as vggsound_clip_name
from .datasets.vggsound import vggsound_split

log = logging.getLogger(__name__)

__all__ = ["write_synthetic", "CLASSES", "ClassSpec", "class_sound", "render_frame",
           "AUDIO_RATE", "ESC50_RATE", "FPS", "VIDEO_SECONDS", "FRAME_SIZE", "IMAGE_SIZE"]

AUDIO_RATE = 16000          # video audio tracks and spoken captions (Flickr8k Audio is 16 kHz)
ESC50_RATE = 44100          # like the real ESC-50 clips, so readers exercise resampling
ESC50_SECONDS = 5.0
FPS = 8
VIDEO_SECONDS = 3
N_FRAMES = FPS * VIDEO_SECONDS
FRAME_SIZE = 112            # square video frames (H.264 needs even sizes)
IMAGE_SIZE = (160, 120)     # Flickr-like landscape stills
PLANTED_FRACTION = 0.25     # share of each video's frames that show a different class
SPLITS = ("train", "val", "test")
UNDISCLOSED = "__UNDISCLOSED__"
AVSD_FILES = {"train": "train_set4DSTC7-AVSD.json", "val": "valid_set4DSTC7-AVSD.json",
              "test": "test_set4DSTC7-AVSD.json"}
AVSD_MULTIREF = "test_set4DSTC7-AVSD_multiref.json"
FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                      "test": "Flickr_8k.testImages.txt"}
ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take"
ESC10 = {"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing", "clock_tick",
         "helicopter", "chainsaw"}  # the ESC-10 subset of the real ESC-50 categories
SPEECH_MODES = ("auto", "on", "off")
MAX_ITEMS = 100_000         # far inside the id spaces ("S" + 4 of 36 characters, 6-digit ESC-50 sources)


# ----------------------------------------------------------------------------------------------------------------
# Classes: one visual and one audio signature each, plus the words dialogues and captions use
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassSpec:
    name: str
    bg: tuple[int, int, int]        # background colour: the strongest visual cue (survives 32x32 CLIP input)
    bg_name: str
    fg: tuple[int, int, int]        # shape colour
    fg_name: str
    shape: str                      # circle | box | triangle | streaks | diamond | cross
    band_hz: tuple[float, float]    # holds the class sound's dominant frequency, pitch jitter included;
                                    # the bands of different classes are disjoint
    sound: str                      # sound description ("a dog barking")
    vggsound: str                   # the VGGSound class this sound stands for (its label in vggsound.csv)
    action: str                     # what a person does in the scene
    charades: str                   # the same action as a Charades class name ("Walking a dog")
    # speakable caption templates ({bg} = background colour), worded so that Whisper tiny.en transcribes
    # espeak-ng's voice correctly: e.g. "birds" survives where a lone "bird" is heard as "word"
    captions: tuple[str, ...]


CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("dog", (200, 40, 40), "red", (245, 245, 245), "white", "circle", (270, 330),
              "a dog barking", "dog barking", "a person walks a dog", "Walking a dog",
              ("A dog is barking in a {bg} room .", "A small dog runs to the {bg} door .",
               "The dog plays with a ball on a {bg} rug .")),
    ClassSpec("car", (40, 70, 200), "blue", (245, 215, 40), "yellow", "box", (80, 100),
              "a car engine running", "car engine idling", "a person drives a car", "Driving a car",
              ("A car drives on a {bg} road .", "A man starts the car in a {bg} garage .",
               "The old car is parked by a {bg} wall .")),
    ClassSpec("bird", (40, 160, 60), "green", (250, 140, 20), "orange", "triangle", (2850, 4400),
              "a bird singing", "bird chirping, tweeting", "a person feeds a bird", "Feeding a bird",
              ("Many birds sing in the {bg} trees .", "Two birds are flying over the {bg} grass .",
               "The birds are singing in the {bg} park .")),
    ClassSpec("rain", (35, 35, 50), "black", (150, 200, 255), "light blue", "streaks", (4800, 7300),
              "rain falling", "raining", "a person opens an umbrella in the rain", "Opening an umbrella",
              ("Rain is falling on a {bg} roof .", "Heavy rain falls on the {bg} road .",
               "It is raining on the dark street .")),
    ClassSpec("bell", (230, 200, 40), "yellow", (110, 30, 150), "purple", "diamond", (1150, 1250),
              "a bell ringing", "church bell ringing", "a person rings a bell", "Ringing a bell",
              ("The church bell rings in the {bg} town .", "Church bells are ringing over the {bg} houses .",
               "A church bell rings in a {bg} tower .")),
    ClassSpec("siren", (190, 50, 170), "purple", (60, 225, 230), "cyan", "cross", (560, 950),
              "a siren wailing", "ambulance siren", "a person drives an ambulance", "Driving an ambulance",
              ("A loud siren is heard on a {bg} road .", "The fire truck siren is very loud .",
               "An ambulance siren sounds near a {bg} house .")),
)


# ----------------------------------------------------------------------------------------------------------------
# Audio signatures: very different pitch bands and envelopes, so even a random conv-net over fbanks separates them
# ----------------------------------------------------------------------------------------------------------------

def class_sound(name: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 sound of class `name`; `rng` varies pitch (+-3 %), rhythm phase and level per instance."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    jitter = float(rng.uniform(0.97, 1.03))
    x = _SOUNDS[name](t, sr, jitter, rng)
    x = x / (np.abs(x).max() + 1e-9) * float(rng.uniform(0.5, 0.7))
    x = x + 0.003 * rng.standard_normal(n)  # a faint noise floor: real recordings are never digitally silent
    return x.astype(np.float32)


def _bursts(t: np.ndarray, rate: float, phase: float, attack: float, decay: float) -> np.ndarray:
    """A train of sharp-attack, exponentially decaying envelopes, `rate` per second."""
    local = np.mod(t + phase, 1.0 / rate)
    return np.minimum(local / attack, 1.0) * np.exp(-np.maximum(local - attack, 0.0) / decay)


def _dog(t, sr, j, rng):  # barks: 300 Hz harmonic bursts, 2.5 per second
    f0 = 300.0 * j
    tone = sum(a * np.sin(2 * np.pi * k * f0 * t) for k, a in ((1, 1.0), (2, 0.45), (3, 0.25), (4, 0.12)))
    return tone * _bursts(t, 2.5, rng.uniform(0, 0.4), 0.01, 0.06)


def _car(t, sr, j, rng):  # engine drone: 90 Hz sawtooth-like harmonics, 6 Hz rumble
    f0 = 90.0 * j
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 9))
    return tone * (1.0 + 0.3 * np.sin(2 * np.pi * 6.0 * t + rng.uniform(0, 2 * np.pi)))


def _bird(t, sr, j, rng):  # chirps: linear 3.0 -> 4.2 kHz sweeps of 60 ms, 7 per second
    period, length = 1 / 7.0, 0.06
    f0, slope = 3000.0 * j, 1200.0 * j / length
    local = np.mod(t + rng.uniform(0, period), period)  # time since the current chirp started
    env = np.where(local < length, np.sin(np.pi * np.minimum(local, length) / length) ** 2, 0.0)
    return np.sin(2 * np.pi * (f0 * local + 0.5 * slope * local ** 2)) * env


def _rain(t, sr, j, rng):  # hiss: noise band-limited to 5-7 kHz by zeroing FFT bins
    spec = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1.0 / sr)
    spec[(freqs < 5000.0 * j) | (freqs > 7000.0 * j)] = 0
    return np.fft.irfft(spec, n=len(t))


def _bell(t, sr, j, rng):  # strikes: 1.2 kHz + inharmonic partial, decaying, every 0.75 s
    f0 = 1200.0 * j
    tone = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(2 * np.pi * 2.51 * f0 * t)
    return tone * _bursts(t, 1 / 0.75, rng.uniform(0, 0.5), 0.005, 0.25)


def _siren(t, sr, j, rng):  # wail: continuous tone swept 600 <-> 900 Hz at 0.8 Hz
    centre, depth, rate = 750.0 * j, 150.0 * j, 0.8
    phase0 = rng.uniform(0, 2 * np.pi)
    inst_phase = 2 * np.pi * centre * t - depth / rate * np.cos(2 * np.pi * rate * t + phase0)
    return np.sin(inst_phase)


_SOUNDS = {"dog": _dog, "car": _car, "bird": _bird, "rain": _rain, "bell": _bell, "siren": _siren}


# ----------------------------------------------------------------------------------------------------------------
# Visual signatures
# ----------------------------------------------------------------------------------------------------------------

_FONT_CACHE: dict[int, ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.ImageFont:
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)  # scalable built-in font (needs FreeType)
        except (TypeError, ImportError, OSError):
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


def render_frame(spec: ClassSpec, size: tuple[int, int], centre: tuple[float, float], radius: float,
                 bg_shift: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """An RGB uint8 image: class background, the class shape at `centre` (pixels), the class word on top."""
    bg = tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(spec.bg, bg_shift))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    _draw_shape(draw, spec.shape, centre, radius, spec.fg)
    font = _font(max(10, size[1] // 8))
    draw.text((4, 2), spec.name.upper(), fill=spec.fg, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(img)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], r: float, fill) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "box":
        draw.rectangle([cx - 1.3 * r, cy - 0.7 * r, cx + 1.3 * r, cy + 0.7 * r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "streaks":  # rain: slanted parallel strokes around the centre
        for k in range(-3, 4):
            x0 = cx + k * r / 3
            draw.line([(x0, cy - r), (x0 - r / 4, cy + r)], fill=fill, width=max(2, int(r / 8)))
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------------------------------------------
# The plan: every scene's class, split, ids and random streams, decided before any media is written
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Scene:
    index: int
    cls: int                       # index into the active classes
    split: str                     # train | val | test (shared by the AVSD and Flickr layouts)
    video_id: str                  # Charades-like id
    stem: str                      # Flickr8k-like image stem
    esc_src: int                   # ESC-50 "src_file" (a freesound id in the real set)
    planted: list[int]             # frame indices that show `planted_cls` instead of the scene's class
    planted_cls: int


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose, scene ...), so one scene never shifts another's draws."""
    return np.random.default_rng([seed, *stream])


(_STREAM_PLAN, _STREAM_VIDEO, _STREAM_IMAGE, _STREAM_DIALOG, _STREAM_CAPTION, _STREAM_ESC, _STREAM_VGGSOUND,
 _STREAM_LN_COCO) = range(8)


def _plan(items: int, n_classes: int, seed: int) -> list[Scene]:
    rng = _rng(seed, _STREAM_PLAN)
    classes = rng.permutation(np.arange(items) % n_classes)  # balanced: counts differ by at most one
    splits = _stratified_splits(classes, n_classes)
    video_ids = _unique(lambda: "S" + "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), 4)), items)
    stems = _unique(lambda: f"{rng.integers(10**9, 4 * 10**9)}_{rng.integers(0, 16**10):010x}", items)
    srcs = _unique(lambda: int(rng.integers(100000, 999999)), items)
    n_planted = max(1, round(PLANTED_FRACTION * N_FRAMES))
    scenes = []
    for i in range(items):
        start = int(rng.integers(2, N_FRAMES - n_planted - 1))  # keep own-class frames on both sides
        other = [c for c in range(n_classes) if c != classes[i]]
        scenes.append(Scene(i, int(classes[i]), splits[i], video_ids[i], stems[i], srcs[i],
                            list(range(start, start + n_planted)), int(rng.choice(other))))
    return scenes


def _unique(draw, n: int) -> list:
    """n distinct values from `draw`, in draw order (so the result is a function of the rng state)."""
    values, seen = [], set()
    while len(values) < n:
        value = draw()
        if value not in seen:
            seen.add(value)
            values.append(value)
    return values


def _stratified_splits(classes: np.ndarray, n_classes: int) -> list[str]:
    """~70/15/15 within each class, so every class reaches every split once it has 3 scenes."""
    splits = ["train"] * len(classes)
    for c in range(n_classes):
        members = [i for i in range(len(classes)) if classes[i] == c]
        n = len(members)
        n_test = max(1, round(0.15 * n)) if n >= 2 else 0
        n_val = max(1, round(0.15 * n)) if n >= 3 else 0
        for i in members[n - n_test:]:
            splits[i] = "test"
        for i in members[n - n_test - n_val:n - n_test]:
            splits[i] = "val"
    return splits


# ----------------------------------------------------------------------------------------------------------------
# AVSD / Charades
# ----------------------------------------------------------------------------------------------------------------

def _video_frames(scene: Scene, classes: list[ClassSpec], seed: int) -> np.ndarray:
    """(N_FRAMES, H, W, 3): the class shape slides across the frame; the planted span shows another class."""
    rng = _rng(seed, _STREAM_VIDEO, scene.index)
    shift = tuple(int(v) for v in rng.integers(-12, 13, 3))
    radius = FRAME_SIZE * rng.uniform(0.18, 0.24)
    y = FRAME_SIZE * rng.uniform(0.45, 0.6)
    x0, x1 = FRAME_SIZE * rng.uniform(0.2, 0.35), FRAME_SIZE * rng.uniform(0.65, 0.8)
    if rng.random() < 0.5:
        x0, x1 = x1, x0  # move left or right
    frames = []
    for f in range(N_FRAMES):
        spec = classes[scene.planted_cls if f in scene.planted else scene.cls]
        x = x0 + (x1 - x0) * f / (N_FRAMES - 1)
        frames.append(render_frame(spec, (FRAME_SIZE, FRAME_SIZE), (x, y), radius, shift))
    return np.stack(frames)


def _write_video(path: Path, frames: np.ndarray, audio: np.ndarray) -> None:
    """H.264 (yuv420p) at FPS + AAC mono at AUDIO_RATE in an mp4, deterministic byte for byte."""
    import av

    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        # one thread: reproducible output; no B-frames: every decoder returns frames without reordering delay.
        # No macroblock tree: x264's mbtree reads uninitialised stack memory (valgrind shows it), so the QPs it
        # picked, and so the bytes, depended on what had run before in the process (seen as a flaky test).
        video.options = {"crf": "16", "preset": "veryfast", "threads": "1", "bf": "0", "x264-params": "mbtree=0"}
        sound = container.add_stream("aac", rate=AUDIO_RATE)
        sound.layout = "mono"
        sound.bit_rate = 96000
        for i, rgb in enumerate(frames):
            # frames go in as yuv420p converted here: libswscale's RGB->YUV picks SIMD paths by buffer
            # alignment, and those round differently, so letting PyAV convert made output depend on the heap
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        step = sound.codec_context.frame_size or 1024  # AAC consumes fixed 1024-sample frames
        for start in range(0, len(audio), step):
            chunk = np.ascontiguousarray(audio[None, start:start + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = start
            frame.time_base = Fraction(1, AUDIO_RATE)
            container.mux(sound.encode(frame))
        container.mux(sound.encode())


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H*3/2, W) uint8 planar Y, U, V (PyAV's yuv420p layout), BT.601 limited range,
    the matrix decoders assume for untagged SD video; chroma is the mean of each 2x2 block."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape

    def pool(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.ravel(), pool(u).ravel(), pool(v).ravel()]
    return np.clip(np.round(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


_QUESTIONS = (  # (question, answer templates: first = the dialog answer, all = test references)
    ("what do you see in the video ?",
     ("i see {a_fg} {shape} on a {bg} background", "there is {a_fg} {shape} in front of a {bg} wall",
      "{a_fg} {shape} moves across a {bg} screen")),
    ("what can you hear ?",
     ("i can hear {sound}", "the sound is {sound}", "there is {sound} in the audio")),
    ("what color is the background ?",
     ("the background is {bg}", "it is {bg}", "{bg} , the whole time")),
    ("is there any writing on the screen ?",
     ("yes , it says {word}", "the word {word} is written at the top", "yes , {word} in {fg} letters")),
    ("what is happening in the video ?",
     ("{action}", "it looks like {action}", "i think {action}")),
    ("does the sound change during the video ?",
     ("no , it is {sound} the whole time", "no , just {sound}", "it stays the same , {sound}")),
)

_SHAPE_WORDS = {"circle": "circle", "box": "box", "triangle": "triangle", "streaks": "set of streaks",
                "diamond": "diamond", "cross": "cross"}


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _visual(spec: ClassSpec) -> str:
    return f"{_article(spec.fg_name)} {_SHAPE_WORDS[spec.shape]} on a {spec.bg_name} background"


def _slots(spec: ClassSpec) -> dict[str, str]:
    return {"fg": spec.fg_name, "a_fg": _article(spec.fg_name), "bg": spec.bg_name,
            "shape": _SHAPE_WORDS[spec.shape], "sound": spec.sound, "word": spec.name, "action": spec.action}


def _dialog(scene: Scene, spec: ClassSpec, seed: int) -> tuple[dict, list[str]]:
    """One AVSD dialog (3-5 turns) and the reference answers for its last turn."""
    rng = _rng(seed, _STREAM_DIALOG, scene.index)
    slots = _slots(spec)
    order = rng.permutation(len(_QUESTIONS))[: int(rng.integers(3, 6))]
    turns = [{"question": _QUESTIONS[q][0], "answer": _QUESTIONS[q][1][0].format(**slots)} for q in order]
    refs = [a.format(**slots) for a in _QUESTIONS[order[-1]][1]]
    entry = {"image_id": scene.video_id,
             "caption": f"{spec.action} in a {spec.bg_name} room .",
             "summary": f"{spec.action} while {spec.sound} can be heard . there is {_visual(spec)} .",
             "dialog": turns}
    return entry, refs


def _write_avsd(root: Path, scenes: list[Scene], classes: list[ClassSpec], seed: int) -> dict:
    video_dir = root / "avsd" / "Charades_v1_480"
    video_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    multiref = []
    for scene in scenes:
        spec = classes[scene.cls]
        audio = class_sound(spec.name, VIDEO_SECONDS, AUDIO_RATE, _rng(seed, _STREAM_VIDEO, scene.index, 1))
        _write_video(video_dir / f"{scene.video_id}.mp4", _video_frames(scene, classes, seed), audio)
        entry, refs = _dialog(scene, spec, seed)
        if scene.split == "test":
            ref_entry = json.loads(json.dumps(entry))
            ref_entry["dialog"][-1]["answer"] = refs
            multiref.append(ref_entry)
            entry["dialog"][-1]["answer"] = UNDISCLOSED
        by_split[scene.split].append(entry)
    for split, name in AVSD_FILES.items():
        _write_json(root / "avsd" / name, {"type": "scene_aware_dialog", "dialogs": by_split[split]})
    _write_json(root / "avsd" / AVSD_MULTIREF, {"type": "scene_aware_dialog", "dialogs": multiref})
    _write_charades(root / "avsd" / "Charades", scenes, classes)
    return {split: len(v) for split, v in by_split.items()}


CHARADES_HEADER = ("id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                   "descriptions", "actions", "length")


def _write_charades(folder: Path, scenes: list[Scene], classes: list[ClassSpec]) -> None:
    """Charades' own annotations of the videos: the scene's action over the whole clip, and the planted class's
    action over the planted frames ("c000 0.00 3.00;c002 1.25 1.75"). Train and val videos are in the train file,
    as AVSD's train and valid dialogs both come from Charades' training videos."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_lines(folder / "Charades_v1_classes.txt", [f"c{i:03d} {c.charades}" for i, c in enumerate(CLASSES)])
    for split, name in (("train", "Charades_v1_train.csv"), ("test", "Charades_v1_test.csv")):
        with open(folder / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CHARADES_HEADER)
            for scene in scenes:
                if (scene.split == "test") != (split == "test"):
                    continue
                spec = classes[scene.cls]
                planted = (scene.planted_cls, scene.planted[0] / FPS, (scene.planted[-1] + 1) / FPS)
                actions = sorted([(scene.cls, 0.0, float(VIDEO_SECONDS)), planted])
                writer.writerow([scene.video_id, f"SY{scene.index % 10:02d}", "Living room", 6, 7, "Yes",
                                 f"{spec.action} .", spec.name, f"{spec.action} while {spec.sound} can be heard .",
                                 ";".join(f"c{c:03d} {start:.2f} {end:.2f}" for c, start, end in actions),
                                 f"{VIDEO_SECONDS:.2f}"])


# ----------------------------------------------------------------------------------------------------------------
# Flickr8k Audio Captions
# ----------------------------------------------------------------------------------------------------------------

def _still(scene: Scene, spec: ClassSpec, seed: int) -> np.ndarray:
    """A still of the class signature, placed and sized differently from the scene's video."""
    rng = _rng(seed, _STREAM_IMAGE, scene.index)
    w, h = IMAGE_SIZE
    radius = h * rng.uniform(0.2, 0.3)
    centre = (w * rng.uniform(0.3, 0.7), h * rng.uniform(0.45, 0.65))
    shift = tuple(int(v) for v in rng.integers(-12, 13, 3))
    return render_frame(spec, IMAGE_SIZE, centre, radius, shift)


def _caption(scene: Scene, spec: ClassSpec, n: int) -> str:
    return spec.captions[(scene.index + n) % len(spec.captions)].format(bg=spec.bg_name)


def _spoken_caption(text: str, spec: ClassSpec, rng: np.random.Generator, speak: bool) -> np.ndarray:
    """TTS of the caption with the class sound mixed in at a low level; the class sound alone without TTS."""
    if not speak:
        return class_sound(spec.name, 3.0, AUDIO_RATE, rng)
    voice = tts.synthesize(text, AUDIO_RATE)
    voice = 0.6 * voice / (np.abs(voice).max() + 1e-9)
    pad = np.zeros(int(0.3 * AUDIO_RATE), np.float32)  # ASR models like a little silence around speech
    voice = np.concatenate([pad, voice, pad])
    background = class_sound(spec.name, len(voice) / AUDIO_RATE, AUDIO_RATE, rng)[: len(voice)]
    return voice + 0.08 * background


def _write_flickr(root: Path, scenes: list[Scene], classes: list[ClassSpec], seed: int, captions: int,
                  speak: bool) -> tuple[dict, dict]:
    base = root / "flickr8k_audio"
    img_dir, text_dir, wav_dir = base / "Flicker8k_Dataset", base / "Flickr8k_text", base / "flickr_audio" / "wavs"
    for d in (img_dir, text_dir, wav_dir):
        d.mkdir(parents=True, exist_ok=True)
    tokens, wav2capt, split_lists, truth = [], [], {s: [] for s in SPLITS}, {}
    for scene in scenes:
        spec = classes[scene.cls]
        image = f"{scene.stem}.jpg"
        # 4:4:4 chroma and high quality keep the colour signature exact enough; PIL's JPEG output is deterministic
        Image.fromarray(_still(scene, spec, seed)).save(img_dir / image, quality=95, subsampling=0)
        split_lists[scene.split].append(image)
        for n in range(captions):
            text = _caption(scene, spec, n)
            wav = f"{scene.stem}_{n}.wav"
            _write_wav(wav_dir / wav, _spoken_caption(text, spec, _rng(seed, _STREAM_CAPTION, scene.index, n), speak),
                       AUDIO_RATE)
            tokens.append(f"{image}#{n}\t{text}")
            wav2capt.append(f"{wav} {image} #{n}")
            truth[f"flickr8k_audio:{scene.stem}_{n}"] = {"class": spec.name, "split": scene.split,
                                                         "image": image, "caption": text, "spoken": speak}
    _write_lines(text_dir / "Flickr8k.token.txt", tokens)
    _write_lines(base / "flickr_audio" / "wav2capt.txt", wav2capt)
    for split, name in FLICKR_SPLIT_FILES.items():
        _write_lines(text_dir / name, split_lists[split])
    return {split: len(v) * captions for split, v in split_lists.items()}, truth


# ----------------------------------------------------------------------------------------------------------------
# ESC-50
# ----------------------------------------------------------------------------------------------------------------

_FOLD_CYCLE = (5, 4, 1, 2, 3)  # per class: the first clip goes to fold 5 (test), so every class is in the test fold


def _write_esc50(root: Path, scenes: list[Scene], classes: list[ClassSpec], seed: int,
                 per_scene: int) -> tuple[dict, dict]:
    audio_dir, meta_dir = root / "esc50" / "audio", root / "esc50" / "meta"
    audio_dir.mkdir(parents=True, exist_ok=True)
    meta_dir.mkdir(parents=True, exist_ok=True)
    rows, truth, seen_per_class = [], {}, [0] * len(classes)
    for scene in scenes:
        spec = classes[scene.cls]
        for k in range(per_scene):
            fold = _FOLD_CYCLE[seen_per_class[scene.cls] % len(_FOLD_CYCLE)]
            seen_per_class[scene.cls] += 1
            take = "ABCDEFGHIJ"[k]
            # target = index into classes.json "classes" (the real ESC-50 numbers 50 categories differently)
            stem = f"{fold}-{scene.esc_src}-{take}-{scene.cls}"
            clip = class_sound(spec.name, ESC50_SECONDS, ESC50_RATE, _rng(seed, _STREAM_ESC, scene.index, k))
            _write_wav(audio_dir / f"{stem}.wav", clip, ESC50_RATE)
            rows.append((fold, stem, f"{stem}.wav,{fold},{scene.cls},{spec.name},{spec.name in ESC10},"
                                     f"{scene.esc_src},{take}"))
            truth[f"esc50:{stem}"] = {"class": spec.name, "fold": fold}
    rows.sort(key=lambda r: (r[0], r[1]))  # the real csv is sorted by filename, i.e. by fold first
    _write_lines(meta_dir / "esc50.csv", [ESC50_HEADER] + [r[2] for r in rows])
    folds = {str(f): sum(1 for r in rows if r[0] == f) for f in range(1, 6)}
    return folds, truth


# ----------------------------------------------------------------------------------------------------------------
# VGGSound
# ----------------------------------------------------------------------------------------------------------------

_YOUTUBE_ALPHABET = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _youtube_ids(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    """A distinct 11-character YouTube-like id per scene, drawn until the adapter's hash split of the training
    rows (vggsound_split) puts it in the scene's own split: the VGGSound part keeps the scenes' train/val/test, so
    it never holds as training data a video another part holds out."""
    ids: list[str] = []
    taken: set[str] = set()
    for scene in scenes:
        csv_split = "test" if scene.split == "test" else "train"
        while True:
            candidate = "".join(rng.choice(_YOUTUBE_ALPHABET, 11))
            if candidate not in taken and vggsound_split(candidate, csv_split) == scene.split:
                ids.append(candidate)
                taken.add(candidate)
                break
    return ids


def _write_vggsound(root: Path, scenes: list[Scene], classes: list[ClassSpec], seed: int) -> tuple[dict, dict]:
    """vggsound.csv as published (no header, `youtube_id,start_seconds,label,split`, a label holding a comma
    quoted) and each scene's AVSD video copied under its clip name `<youtube_id>_<start:06d>.mp4` in `video/`:
    a VGGSound clip is a video with its sound, which the scene's video already is."""
    base = root / "vggsound"
    video_dir = base / "video"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, _STREAM_VGGSOUND)
    records, truth = [], {}
    for scene, youtube_id in zip(scenes, _youtube_ids(scenes, rng)):
        spec = classes[scene.cls]
        start = int(rng.integers(0, 300))  # where the clip was cut from the YouTube video (seconds)
        name = vggsound_clip_name(youtube_id, start)
        shutil.copyfile(root / "avsd" / "Charades_v1_480" / f"{scene.video_id}.mp4", video_dir / name)
        records.append((youtube_id, start, spec.vggsound, "test" if scene.split == "test" else "train"))
        truth[f"vggsound:{Path(name).stem}"] = {"class": spec.name, "label": spec.vggsound, "split": scene.split,
                                                "video": f"avsd:{scene.video_id}"}
    records.sort()  # the published csv is sorted by YouTube id
    with open(base / "vggsound.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(records)
    return {split: sum(1 for s in scenes if s.split == split) for split in SPLITS}, truth


# ----------------------------------------------------------------------------------------------------------------
# Localized Narratives COCO
# ----------------------------------------------------------------------------------------------------------------

LN_COCO_FILES = {"train": "coco_train_localized_narratives-00000-of-00001.jsonl",
                 "val": "coco_val_localized_narratives.jsonl"}
OPUS_RATE = 48000           # Opus always runs at 48 kHz, as the Localized Narratives recordings do


def _coco_image_ids(scenes: list[Scene], rng: np.random.Generator) -> list[int]:
    """A distinct COCO-like image id per scene, drawn until the adapter's split (ln_coco_split) is the scene's own:
    test scenes go in the val file (LN-COCO's val is the test split), train and val scenes in the train file."""
    ids: list[int] = []
    for scene in scenes:
        file_split = "val" if scene.split == "test" else "train"
        while True:
            candidate = int(rng.integers(1, 600_000))
            if candidate not in ids and ln_coco_split(candidate, file_split) == scene.split:
                ids.append(candidate)
                break
    return ids


def _narration(scene: Scene, spec: ClassSpec) -> str:
    caption = _caption(scene, spec, 0)
    return f"In this picture {caption[0].lower()}{caption[1:]}"  # the way Localized Narratives narrators start


def _write_ln_coco(root: Path, scenes: list[Scene], classes: list[ClassSpec], seed: int,
                   speak: bool) -> tuple[dict, dict]:
    """The published layout: the jsonl files (one narration a line, image_id a string as published), each
    narration as Ogg Opus under its `voice_recording` path, each scene's Flickr still as a COCO 2017 image."""
    base = root / "ln_coco"
    rng = _rng(seed, _STREAM_LN_COCO)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    truth = {}
    for scene, image_id in zip(scenes, _coco_image_ids(scenes, rng)):
        spec = classes[scene.cls]
        file_split = "val" if scene.split == "test" else "train"
        annotator_id = int(rng.integers(1, 200))
        recording = f"coco_{file_split}/coco_{file_split}_{image_id}_{annotator_id}.ogg"
        image_dir = base / f"{file_split}2017"
        image_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_still(scene, spec, seed)).save(image_dir / coco_image_name(image_id), quality=95,
                                                        subsampling=0)
        text = _narration(scene, spec)
        voice = _spoken_caption(text, spec, _rng(seed, _STREAM_LN_COCO, scene.index), speak)
        (base / recording).parent.mkdir(parents=True, exist_ok=True)
        _write_ogg_opus(base / recording, voice, AUDIO_RATE)
        seconds = round(len(voice) / AUDIO_RATE, 3)
        lines[file_split].append(json.dumps({
            "dataset_id": f"mscoco_{file_split}2017", "image_id": str(image_id), "annotator_id": annotator_id,
            "caption": text, "timed_caption": [{"utterance": text, "start_time": 0.0, "end_time": seconds}],
            "traces": [], "voice_recording": recording}))
        truth[f"ln_coco:{Path(recording).stem}"] = {"class": spec.name, "split": scene.split, "image_id": image_id,
                                                    "caption": text, "spoken": speak}
    for file_split, name in LN_COCO_FILES.items():
        _write_lines(base / name, lines[file_split])
    return {split: sum(1 for s in scenes if s.split == split) for split in SPLITS}, truth


# ----------------------------------------------------------------------------------------------------------------
# Small deterministic writers
# ----------------------------------------------------------------------------------------------------------------

def _write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    """PCM16 mono WAV with the standard library (a fixed 44-byte header: byte-identical for equal samples)."""
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def _write_ogg_opus(path: Path, x: np.ndarray, sr: int) -> None:
    """Mono Ogg Opus through PyAV's libopus; +bitexact gives fixed stream serial numbers, so equal samples give
    equal bytes (libsndfile's Ogg writer draws a random serial number)."""
    import av

    with av.open(str(path), "w", format="ogg", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libopus", rate=OPUS_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.clip(x, -1.0, 1.0).astype(np.float32)[None, :], format="flt",
                                           layout="mono")  # (1, N)
        frame.sample_rate = sr
        # libopus takes fixed 20 ms frames in its own sample format
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=OPUS_RATE,
                                      frame_size=stream.codec_context.frame_size)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

_OUTPUTS = ("avsd", "flickr8k_audio", "esc50", "vggsound", "ln_coco", "classes.json")


def _validate(items, n_classes, seed, speech, captions_per_image, esc50_per_scene, vggsound, ln_coco) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(n_classes) or not 2 <= n_classes <= len(CLASSES):
        raise ValueError(f"n_classes must be an integer between 2 and {len(CLASSES)}, got {n_classes!r}")
    if not is_int(items) or not n_classes <= items <= MAX_ITEMS:
        raise ValueError(f"items must be an integer from n_classes ({n_classes}, so every class has a scene) "
                         f"to {MAX_ITEMS}, got {items!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if speech not in SPEECH_MODES:
        raise ValueError(f"speech must be one of {SPEECH_MODES}, got {speech!r}")
    if not is_int(captions_per_image) or not 1 <= captions_per_image <= 5:
        raise ValueError(f"captions_per_image must be 1..5 (Flickr8k has 5), got {captions_per_image!r}")
    if not is_int(esc50_per_scene) or not 1 <= esc50_per_scene <= 10:
        raise ValueError(f"esc50_per_scene must be 1..10, got {esc50_per_scene!r}")
    if not isinstance(vggsound, bool):
        raise ValueError(f"vggsound must be true or false, got {vggsound!r}")
    if not isinstance(ln_coco, bool):
        raise ValueError(f"ln_coco must be true or false, got {ln_coco!r}")


def _resolve_speech(speech: str) -> bool:
    if speech == "off":
        return False
    if tts.available():
        return True
    if speech == "on":
        raise tts.TTSUnavailable("speech='on' but espeak-ng text-to-speech cannot be loaded "
                                 "(install 'espeakng-loader', or use speech='auto'/'off')")
    warnings.warn("espeak-ng text-to-speech is unavailable: spoken captions carry the class sound only",
                  RuntimeWarning, stacklevel=3)
    return False


def _prepare_out_dir(root: Path) -> None:
    """Rewriting a previous synthetic dataset is fine (stale media of another seed must not linger);
    writing into a non-empty folder that is not one is refused, so real data is never clobbered."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not (root / "classes.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no synthetic dataset (no classes.json); "
                                  "pick an empty or new directory")
        for name in _OUTPUTS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)


def write_synthetic(out_dir, items: int = 24, seed: int = 0, speech: str = "auto", *, n_classes: int = 4,
                    captions_per_image: int = 2, esc50_per_scene: int = 1, vggsound: bool = False,
                    ln_coco: bool = False) -> dict:
    """Write the synthetic dataset under `out_dir` and return a summary.

    items: number of scenes; each gives one AVSD video + dialog, one Flickr8k image with `captions_per_image`
        spoken captions, and `esc50_per_scene` ESC-50 clips. Classes are balanced; splits are ~70/15/15 per class.
    seed: everything (classes, ids, splits, media) is a deterministic function of it.
    speech: "auto" speaks captions with espeak-ng when it loads (else warns and writes class sounds only),
        "on" requires it, "off" never uses it.
    n_classes: how many of CLASSES to use (the first n).
    vggsound: also write the VGGSound layout (`vggsound/`: each scene's video under a clip name, its class's
        VGGSound label, the scene's split). Writing it takes no time, but the synthetic adapter reads every part
        present: its videos double the video items (clip_frames) and add a quarter to the audio items (Whisper,
        BEATs) of every extraction of the whole set, and its labels join the `labels` vocabulary, so off by
        default the demo and the tests' sets stay as they were.
    ln_coco: also write the Localized Narratives COCO layout (`ln_coco/`: one spoken narration per scene of its
        still, test scenes in the val file as LN-COCO's val is the test split). Off by default for the same reason:
        the synthetic adapter would add its images and narrations to every extraction of the whole set.
    Returns {"out_dir", "classes", "items", "seed", "speech", "counts": {...}, "seconds"}.
    """
    started = time.perf_counter()
    _validate(items, n_classes, seed, speech, captions_per_image, esc50_per_scene, vggsound, ln_coco)
    speak = _resolve_speech(speech)
    root = Path(out_dir)
    _prepare_out_dir(root)
    classes = list(CLASSES[:n_classes])
    scenes = _plan(int(items), n_classes, int(seed))

    avsd_counts = _write_avsd(root, scenes, classes, seed)
    flickr_counts, flickr_truth = _write_flickr(root, scenes, classes, seed, captions_per_image, speak)
    esc_counts, esc_truth = _write_esc50(root, scenes, classes, seed, esc50_per_scene)
    counts = {"avsd": avsd_counts, "flickr8k_audio": flickr_counts, "esc50": esc_counts}
    vggsound_truth: dict = {}
    if vggsound:
        counts["vggsound"], vggsound_truth = _write_vggsound(root, scenes, classes, seed)
    ln_coco_truth: dict = {}
    if ln_coco:
        counts["ln_coco"], ln_coco_truth = _write_ln_coco(root, scenes, classes, seed, speak)

    truth = {f"avsd:{s.video_id}": {"class": classes[s.cls].name, "split": s.split,
                                    "own_frames": [f for f in range(N_FRAMES) if f not in s.planted],
                                    "planted_frames": s.planted, "planted_class": classes[s.planted_cls].name,
                                    "n_frames": N_FRAMES, "fps": FPS}
             for s in scenes}
    truth.update(flickr_truth)
    truth.update(esc_truth)
    truth.update(vggsound_truth)
    truth.update(ln_coco_truth)
    _write_json(root / "classes.json", {
        "classes": [c.name for c in classes],
        "sounds": {c.name: c.sound for c in classes},
        **({"vggsound": {c.name: c.vggsound for c in classes}} if vggsound else {}),
        "actions": {c.name: c.action for c in classes},
        "visual": {c.name: _visual(c) for c in classes},
        "seed": int(seed),
        "speech": speak,
        "items": truth,
    })
    summary = {"out_dir": str(root), "classes": [c.name for c in classes], "items": int(items), "seed": int(seed),
               "speech": speak,
               "counts": counts,
               "seconds": round(time.perf_counter() - started, 3)}
    log.info("synthetic dataset: %s", summary)
    return summary
