"""The AVSD answer generator: BART reading "cues | dialogue history | question", optionally with a prefix of
selected CLIP frame embeddings in front of the encoder input, trained with teacher forcing and decoded by beam
search through Hugging Face's `generate`.

Prefix: (B, K, D_clip) frame embeddings go through Linear(D_clip -> d_model) and are prepended to the encoder's
token embeddings, computed exactly as BartEncoder computes them (`embed_tokens` with its `embed_scale`); the
encoder then adds its learned positions over the whole K + L sequence (the prefix takes positions 0..K-1) and the
attention mask is extended by `prefix_mask`. With `use_prefix=False`, or no prefix given, the model is plain BART
on `input_ids`, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput

CUES_LABEL = "cues: "
SEPARATOR = " | "


class AnswerGenerator(nn.Module):
    """BART (`BartForConditionalGeneration`) plus the CLIP-prefix projection.

    model, tokenizer: as `features.bart.create_bart` returns them. clip_dim: D_clip of the frame embeddings.
    use_prefix: the ablation switch; False builds no projection and ignores any prefix passed in.
    """

    def __init__(self, model, tokenizer, clip_dim: int = 512, use_prefix: bool = True):
        super().__init__()
        self.bart = model
        self.tokenizer = tokenizer
        self.use_prefix = bool(use_prefix)
        self.clip_dim = int(clip_dim)
        d_model = int(model.config.d_model)
        self.prefix_proj = nn.Linear(self.clip_dim, d_model) if self.use_prefix else None

    # -- encoder input -------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, d_model): the token embeddings BartEncoder would compute from input_ids."""
        encoder = self.bart.get_encoder()
        embeds = encoder.embed_tokens(input_ids)
        # transformers >= 4.4x scales inside BartScaledWordEmbedding; older encoders multiplied after the lookup
        if not hasattr(encoder.embed_tokens, "embed_scale"):
            embeds = embeds * getattr(encoder, "embed_scale", 1.0)
        return embeds

    def _uses(self, prefix) -> bool:
        return self.use_prefix and prefix is not None

    def encoder_inputs(self, input_ids, attention_mask, prefix=None, prefix_mask=None) -> dict:
        """Keyword arguments for the BART encoder (or for `generate`): {"input_ids", "attention_mask"} without a
        prefix, else {"inputs_embeds": (B, K + L, d_model), "attention_mask": (B, K + L)}."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not self._uses(prefix):
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if prefix.dim() != 3 or prefix.shape[0] != input_ids.shape[0] or prefix.shape[-1] != self.clip_dim:
            raise ValueError(f"prefix must be (B={input_ids.shape[0]}, K, {self.clip_dim}), got {tuple(prefix.shape)}")
        tokens = self.embed_tokens(input_ids)
        projected = self.prefix_proj(prefix.to(self.prefix_proj.weight.dtype)).to(tokens.dtype)
        if prefix_mask is None:
            prefix_mask = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
        return {"inputs_embeds": torch.cat([projected, tokens], dim=1), "attention_mask": mask}

    def encode(self, input_ids, attention_mask, prefix=None, prefix_mask=None) -> tuple[BaseModelOutput, torch.Tensor]:
        """(encoder output (B, [K +] L, d_model), its attention mask)."""
        inputs = self.encoder_inputs(input_ids, attention_mask, prefix, prefix_mask)
        return self.bart.get_encoder()(**inputs, return_dict=True), inputs["attention_mask"]

    # -- training and decoding -----------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, labels, prefix=None, prefix_mask=None):
        """Teacher-forced pass: BART's Seq2SeqLMOutput, whose `.loss` is the mean token cross-entropy over labels
        != -100 (pad the labels with -100, as `collate` does) and `.logits` is (B, T, vocab). The decoder input is
        `labels` shifted right behind the decoder start token, as BART does by itself."""
        inputs = self.encoder_inputs(input_ids, attention_mask, prefix, prefix_mask)
        return self.bart(**inputs, labels=labels, return_dict=True)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, prefix=None, prefix_mask=None, num_beams: int = 4,
                 length_penalty: float = 1.0, max_new_tokens: int = 32, **generate_kwargs) -> list[str]:
        """Answers decoded by `model.generate` (beam search; num_beams=1 is greedy), special tokens dropped.

        With a prefix the encoder input goes in as `inputs_embeds` (generate runs the encoder on it once). Other
        generation settings come from the checkpoint's generation_config (facebook/bart-base's includes e.g.
        no_repeat_ngram_size=3) unless overridden in `generate_kwargs`."""
        inputs = self.encoder_inputs(input_ids, attention_mask, prefix, prefix_mask)
        ids = self.bart.generate(**inputs, num_beams=num_beams, length_penalty=length_penalty,
                                 max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def build_inputs(tokenizer, cue_text: str, history: list[str], question: str, max_length: int) -> list[int]:
    """Encoder token ids of "cues: <cue_text> | <turn 1> | ... | <turn n> | <question>", within <s> ... </s>.

    The parts are tokenized one by one and concatenated, which gives the same ids as tokenizing the joined string
    (byte-level BPE never merges across the space that starts each " | " separator). Texts are stripped.

    Truncation to max_length tokens (<s> and </s> included):
    1. whole history turns are dropped, oldest first, until the rest fits;
    2. if cues + question alone still exceed max_length, the cue part ("cues: ..." tokens) is cut from its end;
    3. when no cue token is left, the question's " | " separator goes too; if the question alone still exceeds
       max_length, it is cut from its end.
    The question is never cut while anything else is left to drop.
    """
    if max_length < 3:
        raise ValueError(f"max_length {max_length} leaves no room for text between <s> and </s>")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    cues = ids(CUES_LABEL + cue_text.strip())
    turns = [ids(SEPARATOR + turn.strip()) for turn in history]
    question_ids = ids(SEPARATOR + question.strip())
    budget = max_length - 2  # <s>, </s>
    while turns and len(cues) + sum(map(len, turns)) + len(question_ids) > budget:
        turns.pop(0)
    if len(cues) + len(question_ids) > budget:
        cues = cues[: max(budget - len(question_ids), 0)]
        if not cues:  # nothing left in front of the question: no separator either
            question_ids = ids(question.strip())[:budget]
    body = cues + [t for turn in turns for t in turn] + question_ids
    return [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]


def collate(tokenizer, inputs: list[list[int]], answers: list[str] | None = None,
            max_answer_length: int = 32) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and, with answers, labels (<s> answer </s>, truncated to
    max_answer_length tokens, padding set to -100 so the loss ignores it)."""
    pad = tokenizer.pad_token_id
    width = max(map(len, inputs))
    batch = {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in inputs], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in inputs], dtype=torch.long),
    }
    if answers is not None:
        targets = []
        for answer in answers:
            row = tokenizer(answer.strip())["input_ids"]
            targets.append(row if len(row) <= max_answer_length else row[: max_answer_length - 1] + [row[-1]])
        width = max(map(len, targets))
        batch["labels"] = torch.tensor([row + [-100] * (width - len(row)) for row in targets], dtype=torch.long)
    return batch
