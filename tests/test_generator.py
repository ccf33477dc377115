"""BART answer generator: tokenizer training, the tiny offline profile, create_bart, build_inputs, the CLIP prefix,
and a tiny model that learns a cue-dependent answer."""
import random

import pytest
import torch

from avcache.features.bart import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, bart_model, build_tiny_bart, create_bart,
                                   train_tokenizer)
from avcache.features.checkpoints import load_profile, sha256_file
from avcache.train.models.generator import AnswerGenerator, build_inputs, collate

COLORS = ["red", "green", "blue", "yellow", "black", "white"]
OBJECTS = ["ball", "cup", "car", "hat"]
CHATTER = ["is anyone talking?", "no, it is quiet.", "where is it?", "on the table."]


def toy_items(n: int, seed: int, colour_in_text: bool = True):
    """(cue, history, question, answer): the answer names the colour the cue gives (in the text, or else only in
    the prefix the test builds from the answer)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        colour, obj = rng.choice(COLORS), rng.choice(OBJECTS)
        history = rng.sample(CHATTER, k=rng.randint(0, 3))
        cue = f"a {obj} is {colour}" if colour_in_text else f"a {obj}"
        items.append((cue, history, f"what color is the {obj}?", f"the {obj} is {colour}"))
    return items


def corpus(items) -> list[str]:
    return [text for cue, history, question, answer in items for text in (cue, *history, question, answer)]


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    items = toy_items(200, seed=0) + toy_items(50, seed=1, colour_in_text=False)
    return build_tiny_bart(tmp_path_factory.mktemp("bart") / "tiny", corpus(items))


def test_tokenizer_trained_on_a_corpus_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(corpus(toy_items(100, seed=0)), vocab_size=400)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (BOS_ID, PAD_ID, EOS_ID)
    assert len(tokenizer) <= 400
    texts = ["what color is the ball?", "the hat is green", "Unseen words: Überraschung ✓ 42  two  spaces"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and tokenizer.unk_token_id not in ids  # byte-level: no unk
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # frequent words became single tokens; BART's pair template <s> A </s></s> B </s>
    assert len(tokenizer(" color", add_special_tokens=False)["input_ids"]) == 1
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("the cup", "is red"))
    assert tokenizer("the cup", "is red")["input_ids"] == [BOS_ID, *a, EOS_ID, EOS_ID, *b, EOS_ID]

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert [again(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=100)


def test_tiny_bart_reloads_through_create_bart_with_identical_logits(tiny_bart, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    model, tokenizer, spec = create_bart(str(tiny_bart))
    assert spec == {"name": "bart", "model": str(tiny_bart), "checkpoint": str(tiny_bart.resolve()),
                    "checkpoint_sha256": sha256_file(tiny_bart / "model.safetensors"),
                    "vocab_size": len(tokenizer), "d_model": 64}
    config = model.config
    assert (config.encoder_layers, config.decoder_layers, config.encoder_attention_heads, config.encoder_ffn_dim,
            config.max_position_embeddings) == (2, 2, 4, 128, 256)
    # the same seeded model, built in memory, against the one read back from disk
    torch.manual_seed(0)
    fresh = BartForConditionalGeneration(BartConfig.from_pretrained(tiny_bart)).eval()
    batch = tokenizer(["what color is the ball?", "a cup"], padding=True, return_tensors="pt")
    with torch.no_grad():
        loaded = model(**batch, decoder_input_ids=batch["input_ids"]).logits
        expected = fresh(**batch, decoder_input_ids=batch["input_ids"]).logits
    assert torch.equal(loaded, expected)
    # the same corpus and seed write the same weights
    again = build_tiny_bart(tmp_path / "again", corpus(toy_items(200, seed=0) + toy_items(50, 1, False)))
    assert sha256_file(again / "model.safetensors") == spec["checkpoint_sha256"]
    assert (again / "tokenizer.json").read_bytes() == (tiny_bart / "tokenizer.json").read_bytes()


def test_ensure_tiny_bart_caches_per_corpus_and_profiles_name_it():
    from avcache.features.checkpoints import cache_dir
    from avcache.features.tiny import ensure_tiny_bart

    texts = corpus(toy_items(20, seed=5))
    path = ensure_tiny_bart(texts)
    assert path.parent == cache_dir() and path.name.startswith("bart-") and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_bart(list(texts)) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_tiny_bart(texts + ["one more line"]) != path
    for name in ("tiny", "tiny-transformers"):
        assert bart_model(load_profile(name), texts) == str(path)
    assert load_profile("real")["bart"]["model"] == "facebook/bart-base"


def test_create_bart_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"(?s)not a local directory.*local path.*tiny profile"):
        create_bart("facebook/bart-avcache-no-such-model")
    with pytest.raises(ValueError, match="local path"):
        create_bart(str(tmp_path / "missing"))


def test_build_inputs_drops_oldest_turns_first_and_keeps_the_question(tiny_bart):
    _, tokenizer, _ = create_bart(str(tiny_bart))

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    cue, history, question = "a ball is red", ["where is it?", "on the table.", "is anyone talking?"], "what color is the ball?"
    full = build_inputs(tokenizer, cue, history, question, max_length=256)
    # piecewise tokenization equals tokenizing the joined text
    assert full == tokenizer("cues: a ball is red | where is it? | on the table. | is anyone talking? | "
                             "what color is the ball?")["input_ids"]
    c, q = ids("cues: a ball is red"), ids(" | what color is the ball?")
    t1, t2, t3 = (ids(" | " + turn) for turn in history)
    assert full == [BOS_ID, *c, *t1, *t2, *t3, *q, EOS_ID]
    # one token short of everything: the oldest turn goes, whole
    assert build_inputs(tokenizer, cue, history, question, len(full) - 1) == [BOS_ID, *c, *t2, *t3, *q, EOS_ID]
    # room for cues + question + the newest turn only
    newest = 2 + len(c) + len(t3) + len(q)
    assert build_inputs(tokenizer, cue, history, question, newest) == [BOS_ID, *c, *t3, *q, EOS_ID]
    assert build_inputs(tokenizer, cue, history, question, newest - 1) == [BOS_ID, *c, *q, EOS_ID]
    # cues + question alone too long: the cues are cut from their end, the question stays whole
    assert build_inputs(tokenizer, cue, history, question, 2 + len(q) + 2) == [BOS_ID, *c[:2], *q, EOS_ID]
    # nothing but the question fits: no cue, no separator; a question longer still is cut from its end
    bare = ids("what color is the ball?")
    assert build_inputs(tokenizer, cue, history, question, 2 + len(q)) == [BOS_ID, *bare, EOS_ID]
    assert build_inputs(tokenizer, cue, history, question, 4) == [BOS_ID, *bare[:2], EOS_ID]


def test_prefix_changes_the_encoder_and_use_prefix_false_is_plain_bart(tiny_bart, torch_one_thread):
    from transformers import BartForConditionalGeneration

    model, tokenizer, _ = create_bart(str(tiny_bart))
    batch = collate(tokenizer, [build_inputs(tokenizer, "a cup is red", [], "what color is the cup?", 64),
                                build_inputs(tokenizer, "a hat", ["where is it?"], "what color is the hat?", 64)],
                    ["the cup is red", "the hat is blue"])
    prefix = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))

    plain = AnswerGenerator(model, tokenizer, clip_dim=16, use_prefix=False)
    with torch.no_grad():
        reference = model(**batch)
        out = plain(**batch, prefix=prefix)  # the switch off: the prefix is ignored
        assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
    assert plain.generate(batch["input_ids"], batch["attention_mask"], num_beams=2, max_new_tokens=6) == \
        tokenizer.batch_decode(model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              num_beams=2, max_new_tokens=6), skip_special_tokens=True)

    gen = AnswerGenerator(model, tokenizer, clip_dim=16, use_prefix=True)
    with torch.no_grad():
        without, mask = gen.encode(batch["input_ids"], batch["attention_mask"])
        with_prefix, long_mask = gen.encode(batch["input_ids"], batch["attention_mask"], prefix=prefix)
        assert torch.equal(gen(**batch).logits, reference.logits)  # no prefix given: plain BART too
        assert with_prefix.last_hidden_state.shape == (2, 3 + batch["input_ids"].shape[1], 64)
        assert torch.equal(long_mask, torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1))
        assert not torch.allclose(with_prefix.last_hidden_state[:, 3:], without.last_hidden_state, atol=1e-3)
        assert gen(**batch, prefix=prefix).logits.shape == reference.logits.shape

    # an empty prefix goes through inputs_embeds: the token embeddings must be exactly the encoder's own, also
    # with scale_embedding (sqrt(d_model)), which facebook/bart-base leaves off
    scaled_config = model.config.__class__.from_dict({**model.config.to_dict(), "scale_embedding": True})
    torch.manual_seed(1)
    scaled = BartForConditionalGeneration(scaled_config).eval()
    for bart in (model, scaled):
        g = AnswerGenerator(bart, tokenizer, clip_dim=16)
        with torch.no_grad():
            a, _ = g.encode(batch["input_ids"], batch["attention_mask"], prefix=torch.zeros(2, 0, 16))
            b = bart.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    with pytest.raises(ValueError, match="prefix must be"):
        gen.encode(batch["input_ids"], batch["attention_mask"], prefix=torch.zeros(2, 3, 8))


def greedy(gen: AnswerGenerator, batch: dict, prefix, max_new_tokens: int) -> list[str]:
    """Step-by-step argmax decoding with the generation config's start / forced-<s> / </s> rules."""
    from transformers.modeling_outputs import BaseModelOutput

    config = gen.bart.generation_config
    texts = []
    with torch.no_grad():
        encoded, mask = gen.encode(batch["input_ids"], batch["attention_mask"], prefix)
        for i in range(batch["input_ids"].shape[0]):
            ids = [config.decoder_start_token_id]
            for step in range(max_new_tokens):
                logits = gen.bart(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state[i:i + 1]), attention_mask=mask[i:i + 1],
                                  decoder_input_ids=torch.tensor([ids])).logits[0, -1]
                token = config.forced_bos_token_id if step == 0 else int(logits.argmax())
                ids.append(token)
                if token == config.eos_token_id:
                    break
            texts.append(gen.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def train(gen: AnswerGenerator, items, prefix_of, steps: int = 150, seed: int = 0) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    gen.train()
    for _ in range(steps):
        chosen = rng.sample(items, 32)
        batch = collate(gen.tokenizer, [build_inputs(gen.tokenizer, c, h, q, 64) for c, h, q, _ in chosen],
                        [a for *_, a in chosen])
        loss = gen(**batch, prefix=prefix_of(chosen)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gen.eval()


def test_tiny_generator_learns_a_cue_dependent_answer(tiny_bart, torch_one_thread):
    model, tokenizer, _ = create_bart(str(tiny_bart))
    gen = AnswerGenerator(model, tokenizer, clip_dim=16, use_prefix=False)
    train(gen, toy_items(200, seed=0), prefix_of=lambda chosen: None)
    test = toy_items(30, seed=2)
    batch = collate(tokenizer, [build_inputs(tokenizer, c, h, q, 64) for c, h, q, _ in test])
    answers = [a for *_, a in test]
    beam = gen.generate(batch["input_ids"], batch["attention_mask"], num_beams=4)
    one = gen.generate(batch["input_ids"], batch["attention_mask"], num_beams=1)
    assert sum(b == a for b, a in zip(beam, answers)) >= 24, list(zip(beam, answers))
    assert sum(g == a for g, a in zip(one, answers)) >= 24
    assert one == greedy(gen, batch, None, max_new_tokens=32)


def test_tiny_generator_reads_the_answer_from_the_prefix(tiny_bart, torch_one_thread):
    """The colour is only in the CLIP prefix (a fixed random code per colour, plus a noise frame)."""
    model, tokenizer, _ = create_bart(str(tiny_bart))
    codes = torch.randn(len(COLORS), 16, generator=torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(1)

    def prefix_of(chosen, colour_of=lambda answer: answer.split()[-1]):
        code = torch.stack([codes[COLORS.index(colour_of(answer))] for *_, answer in chosen])
        return torch.stack([code, torch.randn(code.shape, generator=noise)], dim=1)  # (B, K=2, 16)

    gen = AnswerGenerator(model, tokenizer, clip_dim=16, use_prefix=True)
    train(gen, toy_items(200, seed=0, colour_in_text=False), prefix_of)
    test = toy_items(30, seed=2, colour_in_text=False)
    batch = collate(tokenizer, [build_inputs(tokenizer, c, h, q, 64) for c, h, q, _ in test])
    prefix = prefix_of(test)
    beam = gen.generate(batch["input_ids"], batch["attention_mask"], prefix=prefix, num_beams=4)
    assert sum(b == a for b, (*_, a) in zip(beam, test)) >= 24, beam
    one = gen.generate(batch["input_ids"], batch["attention_mask"], prefix=prefix, num_beams=1)
    assert one == greedy(gen, batch, prefix, max_new_tokens=32)
    # another colour's code in the prefix: the answer follows the prefix, not the text
    shifted = prefix_of(test, colour_of=lambda a: COLORS[(COLORS.index(a.split()[-1]) + 1) % len(COLORS)])
    moved = gen.generate(batch["input_ids"], batch["attention_mask"], prefix=shifted, num_beams=4)
    expected = [a.rsplit(" ", 1)[0] + " " + COLORS[(COLORS.index(a.split()[-1]) + 1) % len(COLORS)]
                for *_, a in test]
    assert sum(m == e for m, e in zip(moved, expected)) >= 24, moved
