"""BART for the AVSD answer generator: one factory from a hub name or a local directory, and the tiny offline profile.

`create_bart(name_or_path)` loads `BartForConditionalGeneration` and its tokenizer with `from_pretrained`, the same
call for `facebook/bart-base` (network or a populated Hugging Face cache) and for any local directory written with
`save_pretrained`. It never falls back to something else: a name that is neither local nor reachable is an error.

The tiny profile (`bart: {model: tiny}`) is a small seeded BART of the real architecture whose byte-level BPE
tokenizer is trained here, with the `tokenizers` library, on the text the recipe passes in (dialogue turns,
captions, answers): no hub access at all. `ensure_tiny_bart(texts)` in features/tiny.py writes it once per corpus.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART's order: ids 0, 1, 2, 3 as in facebook/bart-*
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
TINY_ARCH = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256)
_BYTE_ALPHABET = 256  # byte-level BPE starts from every byte, so no text ever maps to <unk>

# Only for `ensure_tiny_bart()` without texts (smoke runs before a dataset is at hand). The recipe trains the
# tokenizer on its own dataset's text instead; this corpus is not what a real run should use.
FALLBACK_TEXTS = (
    "cues: a man walks into the kitchen and opens the fridge | what does he take out? | he takes out a bottle of milk",
    "cues: a woman sits on the couch reading a book | is she alone in the room? | yes, she is alone the whole time",
    "cues: a dog barks at the door | how many people are in the video? | there is only one person",
    "cues: someone laughs off screen | can you hear any sound? | yes, you can hear laughing and a door closing",
    "cues: the lights are off | is it day or night? | it looks like night because the room is dark",
    "cues: a person picks up a laptop and leaves | what color is the laptop? | the laptop is silver",
)


def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on `texts`, with BART's special tokens and post-processing.

    Ids 0-4 are <s> <pad> </s> <unk> <mask> (BART's first four ids; <mask> follows), the 256 byte symbols come
    next, then the merges learnt from `texts` up to `vocab_size` entries (fewer when the corpus has fewer pairs
    seen at least twice). Pre-tokenization, decoding and the `<s> A </s>` / `<s> A </s></s> B </s>` template are
    those of facebook/bart-*'s tokenizer. Same texts in the same order -> the same vocabulary.

    Returns a `BartTokenizerFast` where the installed transformers can build one from a vocabulary and merges
    (5.x, where it is an alias of the tokenizers-backed RobertaTokenizer), else a `PreTrainedTokenizerFast` around
    the trained tokenizer; both round-trip through save_pretrained / AutoTokenizer.from_pretrained.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    if vocab_size < len(SPECIAL_TOKENS) + _BYTE_ALPHABET:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + _BYTE_ALPHABET} special and "
                         f"byte symbols a byte-level BPE needs")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    backend.post_processor = processors.RobertaProcessing(("</s>", EOS_ID), ("<s>", BOS_ID), trim_offsets=True,
                                                          add_prefix_space=False)
    tokenizer = _wrap(backend)
    probe = texts[: 32]
    if [tokenizer(t)["input_ids"] for t in probe] != [e.ids for e in backend.encode_batch(probe)]:
        raise RuntimeError(f"{type(tokenizer).__name__} does not reproduce the trained tokenizer")
    return tokenizer


def _wrap(backend):
    import transformers
    from transformers import BartTokenizerFast, PreTrainedTokenizerFast

    specials = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                    pad_token="<pad>", mask_token="<mask>")
    if int(transformers.__version__.split(".")[0]) >= 5:
        model = json.loads(backend.to_str())["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return BartTokenizerFast(vocab=model["vocab"], merges=merges, add_prefix_space=False, **specials)
    # transformers 4.x: BartTokenizerFast wants vocab/merges files; the generic wrapper takes the object itself
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def build_tiny_bart(path: str | Path, texts: list[str], seed: int = 0, *, vocab_size: int = 2000) -> Path:
    """A seeded tiny BartForConditionalGeneration (d_model 64, 2+2 layers, 4 heads, ffn 128, 256 positions) with a
    tokenizer trained on `texts`, both written to `path` with save_pretrained. Same texts and seed -> the same
    files. The generation config is BART's: decoder start </s>, forced <s> first and </s> at max length."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    tokenizer = train_tokenizer(list(texts), vocab_size)
    tokenizer.model_max_length = TINY_ARCH["max_position_embeddings"]
    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID)
    config = BartConfig(vocab_size=len(tokenizer), **TINY_ARCH, **ids, forced_eos_token_id=EOS_ID)
    with torch.random.fork_rng(devices=[]):  # seed locally: leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**ids, forced_bos_token_id=BOS_ID, forced_eos_token_id=EOS_ID)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def texts_digest(texts: list[str], **params) -> str:
    """sha256 of a corpus (order kept: it can change the learnt merges) and of the build parameters."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for text in texts:
        encoded = text.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] != ["a", "bc"]
        h.update(encoded)
    return h.hexdigest()


def bart_model(profile: dict, texts: list[str] | None = None) -> str:
    """The `create_bart` argument of a profile's `bart:` section: `tiny` -> the tiny checkpoint built for `texts`
    (written on first use), anything else as given (hub name or local directory)."""
    section = profile.get("bart")
    if not section or not section.get("model"):
        raise ValueError("the profile has no `bart: {model: ...}` section")
    if section["model"] == "tiny":
        from avcache.features.tiny import ensure_tiny_bart

        return str(ensure_tiny_bart(texts))
    return str(section["model"])


def create_bart(name_or_path: str, device: str = "cpu"):
    """(model, tokenizer, spec), like create_clip / create_whisper.

    `from_pretrained` for both model and tokenizer: a hub name (network, or the Hugging Face cache when
    HF_HUB_OFFLINE=1) or a local directory. spec: name, model, checkpoint (the directory the files were read from),
    checkpoint_sha256 (of model.safetensors, or of the weights file the directory holds), vocab_size, d_model.
    The model is returned in eval mode on `device`.
    """
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from avcache.features.whisper import _hf_model_dir, _weights_sha256

    local = Path(name_or_path).expanduser().is_dir()
    source = str(Path(name_or_path).expanduser()) if local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = BartForConditionalGeneration.from_pretrained(source)
    except (OSError, ValueError) as e:  # OSError: not found / hub unreachable; ValueError: not even a valid repo id
        where = "a local directory that" if local else "not a local directory, nor a hub name that is cached or"
        raise ValueError(
            f"cannot load BART {name_or_path!r}: {where} {'cannot be read' if local else 'reachable'} "
            f"({e.__class__.__name__}: {e}). Give a local path written with save_pretrained, or use the tiny "
            f"profile (bart: {{model: tiny}})."
        ) from e
    model.to(device).eval()
    directory = _hf_model_dir(source)
    try:
        digest = _weights_sha256(directory)
    except FileNotFoundError:  # weights resolved elsewhere than config.json's snapshot (e.g. a converted PR ref)
        digest = None
    spec = {
        "name": "bart", "model": name_or_path, "checkpoint": str(directory), "checkpoint_sha256": digest,
        "vocab_size": int(model.config.vocab_size), "d_model": int(model.config.d_model),
    }
    return model, tokenizer, spec
