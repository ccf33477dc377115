"""Text -> gloss rules (exact glosses), gloss BLEU on a hand-computed corpus, and the `gloss` feature set
extracted with the in-process runner."""
from __future__ import annotations

import math

import numpy as np
import pytest

from avcache.features import gloss
from avcache.features.gloss import GLOSS_VERSION, gloss_bleu, gloss_library, text_to_gloss
from avcache.features.store import FeatureStore, StoreMismatchError
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner

EXAMPLES = [
    # plurals, progressive, auxiliary, article, preposition
    ("The dogs are running in the park.", ["DOG", "RUN", "PARK"]),
    # past auxiliary, -ing form, adjective kept
    ("A man was riding a red bicycle.", ["MAN", "RIDE", "RED", "BICYCLE"]),
    # irregular plurals and past tenses; pronoun and determiner dropped
    ("Their children saw three geese and ate the mice.", ["CHILD", "SEE", "THREE", "GOOSE", "EAT", "MOUSE"]),
    # perfect auxiliaries, comparative and superlative
    ("She has been cooking bigger meals than the happiest chef.", ["COOK", "BIG", "MEAL", "HAPPY", "CHEF"]),
    # negation: "not", the "n't" of a contraction, "never", "no"
    ("I don't know.", ["NOT", "KNOW"]),
    ("The cat never sleeps on the sofa.", ["CAT", "NEVER", "SLEEP", "SOFA"]),
    ("There are no apples, and he can't swim.", ["NO", "APPLE", "NOT", "SWIM"]),
    # question words, with do-support dropped
    ("Where did the woman go?", ["WHERE", "WOMAN", "GO"]),
    ("What is he eating, and why?", ["WHAT", "EAT", "WHY"]),
    ("Who won't come? How?", ["WHO", "NOT", "COME", "HOW"]),
    # numbers keep their digits; currency and percent signs are punctuation here
    ("Tom bought 12 eggs for $5.50 on 3 June 2024.", ["TOM", "BUY", "12", "EGG", "5.50", "3", "JUNE", "2024"]),
    # capitalised names mid-sentence are not lemmatised ("Rose" would be RISE); 's and it's go
    ("Yesterday Anna's dog met Rose in Paris.", ["YESTERDAY", "ANNA", "DOG", "MEET", "ROSE", "PARIS"]),
    ("It's raining again!", ["RAIN", "AGAIN"]),
    # punctuation everywhere, curly apostrophes, quotes
    ("\u201cWe\u2019re not leaving,\u201d said the boys... (really).", ["NOT", "LEAVE", "SAY", "BOY"]),
]


@pytest.mark.parametrize("text, expected", EXAMPLES)
def test_text_to_gloss_exact(text, expected):
    assert text_to_gloss(text) == expected


def test_gloss_is_deterministic_across_pipeline_loads():
    texts = [text for text, _ in EXAMPLES]
    first = [text_to_gloss(t) for t in texts]
    gloss.load_pipeline.cache_clear()
    assert [text_to_gloss(t) for t in texts] == first
    assert [text_to_gloss(t) for t in texts] == first


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...!?", "the of a"])
def test_text_without_content_glosses_to_nothing(text):
    assert text_to_gloss(text) == []


@pytest.mark.parametrize("value", [None, b"dogs", ["dogs"], 3])
def test_non_str_is_a_type_error(value):
    with pytest.raises(TypeError, match="expects a str"):
        text_to_gloss(value)


def test_gloss_tokens_are_upper_case_and_never_empty():
    for text, _ in EXAMPLES:
        for token in text_to_gloss(text):
            assert token and token == token.upper() and not any(c.isspace() for c in token)


def test_library_and_rules_identify_the_glosses():
    assert gloss_library().startswith("spacy ") and "spacy-lookups-data " in gloss_library()
    assert GLOSS_VERSION


# -- BLEU -----------------------------------------------------------------------------------------------------

HYPS = [["MAN", "RIDE", "RED", "BICYCLE", "PARK"], ["DOG", "RUN"]]
REFS = [["MAN", "RIDE", "RED", "BICYCLE", "STREET"], ["DOG", "RUN", "PARK"]]


def test_bleu_of_a_hand_computed_corpus():
    # Clipped n-gram matches over the corpus: 1-grams 6/7, 2-grams 4/5, 3-grams 2/3, 4-grams 1/2.
    # Hypothesis length 7 < reference length 8: brevity penalty exp(1 - 8/7).
    bp = math.exp(1 - 8 / 7)
    precisions = [6 / 7, 4 / 5, 2 / 3, 1 / 2]
    expected = {f"BLEU-{n}": bp * math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)}
    scores = gloss_bleu(HYPS, REFS)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
    assert scores["BLEU-1"] == pytest.approx(0.7430382, abs=1e-6)  # 6/7 * exp(-1/7)


def test_bleu_bounds_and_no_smoothing():
    assert gloss_bleu(REFS, REFS) == {f"BLEU-{n}": pytest.approx(1.0) for n in range(1, 5)}
    # No 3-gram matches: BLEU-3 and BLEU-4 are 0 (unsmoothed corpus BLEU), BLEU-1 and -2 are not.
    scores = gloss_bleu([["DOG", "RUN", "CAT", "SLEEP"]], [["DOG", "RUN", "PARK", "CAT", "SLEEP"]])
    assert scores["BLEU-3"] == scores["BLEU-4"] == 0.0 and 0 < scores["BLEU-2"] < scores["BLEU-1"] < 1
    assert gloss_bleu([[]], [["DOG"]]) == {f"BLEU-{n}": 0.0 for n in range(1, 5)}
    assert list(gloss_bleu(HYPS, REFS, max_n=2)) == ["BLEU-1", "BLEU-2"]


@pytest.mark.parametrize("hyps, refs, max_n, message", [
    ([["DOG"]], [["DOG"], ["CAT"]], 4, "one reference each"),
    ([], [], 4, "at least one"),
    (["DOG RUN"], [["DOG", "RUN"]], 4, "list of non-empty gloss tokens"),
    ([["DOG RUN"]], [["DOG", "RUN"]], 4, "without whitespace"),
    ([["DOG"]], [["DOG"]], 0, "max_n"),
])
def test_bleu_rejects_malformed_input(hyps, refs, max_n, message):
    with pytest.raises(ValueError, match=message):
        gloss_bleu(hyps, refs, max_n=max_n)


# -- the `gloss` feature set ----------------------------------------------------------------------------------


@pytest.fixture
def text_manifest(tmp_path):
    rows = [
        dict(item_id="g:0", dataset="folder", split="train", texts=["The dogs are running in the park."],
             text_kinds=["caption"]),
        dict(item_id="g:1", dataset="folder", split="train",
             texts=["A man was riding a red bicycle.", "Where is he going?"], text_kinds=["caption", "question"]),
        dict(item_id="g:2", dataset="folder", split="test", texts=["It is.", "No!"], text_kinds=["text", "answer"]),
        dict(item_id="g:no-text", dataset="folder", split="test"),  # nothing to gloss: not selected
    ]
    path = tmp_path / "manifest.arrow"
    write_manifest(rows, path)
    return path


def test_gloss_feature_set_extracted_and_read_back(text_manifest, tmp_path):
    config = load_config(overrides=["feature_sets=[gloss]", "rows_per_shard=2"])
    report = extract(text_manifest, tmp_path / "store", config, LocalRunner())
    (result,) = report.feature_sets
    assert (result.name, result.selected, result.written, result.failed) == ("gloss", 3, 3, 0)

    fs = FeatureStore(tmp_path / "store")["gloss"]
    fs.verify()
    assert sorted(fs.item_ids) == ["g:0", "g:1", "g:2"]
    assert fs.row("g:0")["glosses"] == ["DOG RUN PARK"]
    assert fs.row("g:1")["glosses"] == ["MAN RIDE RED BICYCLE", "WHERE GO"]
    assert fs.row("g:2")["glosses"] == ["", "NO"]  # a text with no content words keeps its slot
    assert [fs.row(i)["gloss_tokens"] for i in ("g:0", "g:1", "g:2")] == [3, 6, 1]
    assert fs.spec.encoder == {"name": "gloss", "library": gloss_library(), "rules": GLOSS_VERSION}
    assert fs.spec.preprocessing == {} and fs.spec.vectors == {} and fs.spec.sequences == {}
    table = fs.table(columns=["item_id", "glosses", "gloss_tokens"])
    assert np.array_equal(sorted(table.column("gloss_tokens").to_pylist()), [1, 3, 6])

    rerun = extract(text_manifest, tmp_path / "store", config, LocalRunner())
    assert (rerun.feature_sets[0].already_done, rerun.feature_sets[0].written) == (3, 0)


def test_changed_gloss_rules_are_not_mixed_with_stored_glosses(text_manifest, tmp_path, monkeypatch):
    config = load_config(overrides=["feature_sets=[gloss]"])
    extract(text_manifest, tmp_path / "store", config, LocalRunner())
    monkeypatch.setattr(gloss, "GLOSS_VERSION", "gloss-en-next")
    with pytest.raises(StoreMismatchError, match="encoder.rules"):
        extract(text_manifest, tmp_path / "store", config, LocalRunner())
