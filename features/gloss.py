"""English text -> sign-language glosses (BGTAI's gloss-based annotation), and corpus BLEU over glosses.

Library: spaCy (``spacy``) with a blank English pipeline and the lookup lemma table of ``spacy-lookups-data``,
both official Explosion packages on PyPI that work offline. The trained taggers (``en_core_web_sm``) are not on
PyPI and cannot be downloaded here, so there is no POS tagger: spaCy gives the tokenizer (which splits
contractions and normalises them: "n't" -> "not", "wo" -> "will"), the lexical attributes (``like_num``) and the
English stop-word list, and the lookup table gives POS-blind lemmas ("dogs" -> "dog", "was" -> "be",
"riding" -> "ride"). simplemma and lemminflect were compared on the same words: neither has a tokenizer with
contraction norms or a stop-word list, simplemma misses some inflected forms ("bigger" and "felt" stay as
they are), and lemminflect needs a POS tag to choose a lemma and has had no release since 2022.

Rules (``GLOSS_VERSION`` names them; change it whenever a rule or a word list changes), applied per token in
text order:

1. Tokens with no letter or digit (punctuation, symbols, whitespace) are dropped.
2. Numbers (spaCy ``like_num``: "3", "3.5", "1,000", "three", "first") are kept as written, upper-cased;
   digits stay digits.
3. Negation is kept: sign glosses carry it as a sign of its own, and dropping it inverts the meaning.
   "not" / "n't" -> NOT, "no" -> NO, "never" -> NEVER, "nothing" -> NOTHING, "nobody"/"noone" -> NOBODY,
   "none" -> NONE, "nowhere" -> NOWHERE.
4. Question words are kept as written (WHAT, WHERE, WHO, WHOM, WHOSE, WHY, HOW, WHEN, WHICH); without a parser
   a relative "who" / "which" is kept too.
5. Function words are dropped: spaCy's English stop-word list plus a few closed-class words it lacks
   (``_EXTRA_FUNCTION_WORDS``), minus the content words the list also holds (``_CONTENT_STOP_WORDS``: verbs such
   as go/see/make/take, nouns and adjectives such as front/side/top/full, quantifiers such as all/many/more,
   and time/aspect adverbs such as again/always/now). What stays dropped: articles and other determiners,
   pronouns, auxiliaries and modals (every form of be/do/have: there is no tagger to tell "have" the verb from
   the auxiliary), prepositions and particles, conjunctions, degree adverbs (very, so, too: signers show
   degree on the sign), deictic here/there. A word is dropped when its lower-case form, its spaCy norm or its
   lemma is a function word, so "'s", "'re", "wo" and "is" all go.
6. A capitalised word that is not at the start of a sentence or quote (the previous token is a word or a
   comma) is a proper name: upper-cased as written, not lemmatised ("met Rose" gives ROSE, not RISE). Rule 5
   comes first, so a name that is also a function word ("Will", "May") is dropped.
7. Every other word is lemmatised through the lookup table (on its lower-case form, as the table is keyed)
   and upper-cased: plural, tense, participle and comparative inflection go ("children" -> CHILD,
   "went" -> GO, "happier" -> HAPPY). ``_LEMMA_FIXES`` overrides the few table entries that turn frequent
   caption nouns into unrelated words ("evening" -> "even", "ceiling" -> "ceil").

Known limits of a POS-blind lemmatiser: noun/verb homographs take the table's single lemma ("building" ->
BUILD, "left" -> LEAVE); the pronoun "one" counts as a number (ONE); a sentence-initial name that is also a
word in the table is lemmatised; spaCy splits hyphenated words ("T-shirt" -> T SHIRT).
"""
from __future__ import annotations

import functools
import math
from importlib.metadata import version

GLOSS_VERSION = "gloss-en-1 (spacy blank en + lookup lemmas; negation, wh-words, numbers, names kept)"

_NEGATION = {"not": "NOT", "n't": "NOT", "no": "NO", "never": "NEVER", "nothing": "NOTHING", "nobody": "NOBODY",
             "noone": "NOBODY", "none": "NONE", "nowhere": "NOWHERE"}
_QUESTION_WORDS = frozenset({"what", "where", "who", "whom", "whose", "why", "how", "when", "which"})

# Entries of spaCy's stop-word list (an information-retrieval list) that a gloss signs.
_CONTENT_STOP_WORDS = frozenset({
    # verbs other than be/do/have and the modals
    "call", "get", "give", "go", "keep", "make", "made", "move", "put", "say", "see", "show", "take", "used",
    "using", "seem", "seemed", "seeming", "seems", "become", "became", "becomes", "becoming", "please",
    # nouns and adjectives
    "amount", "back", "bottom", "empty", "front", "full", "name", "part", "serious", "side", "top", "whole",
    "same", "other", "others", "another", "last", "next",
    # quantifiers that are signs of their own
    "all", "many", "much", "more", "most", "few", "several", "both", "each", "every", "less", "least", "enough",
    # time, frequency and aspect adverbs
    "again", "already", "always", "often", "sometimes", "once", "now", "still", "together", "alone", "also",
})
# Closed-class words that spaCy's list lacks.
_EXTRA_FUNCTION_WORDS = frozenset({"shall", "ought", "having", "theirs", "somebody", "anybody", "everybody", "till"})

# The lookup table is POS-blind; these entries would turn frequent caption words into unrelated ones.
_LEMMA_FIXES = {"evening": "evening", "ceiling": "ceiling", "clothes": "clothes", "clothing": "clothing",
                "dying": "die", "data": "data", "media": "media", "better": "good", "best": "good",
                "worse": "bad", "worst": "bad"}

# Capitalisation after these is ordinary sentence-style capitalisation, not a name.
_MID_SENTENCE_PUNCT = frozenset({",", ";"})


@functools.lru_cache(maxsize=1)
def _function_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset((set(STOP_WORDS) | _EXTRA_FUNCTION_WORDS) - _CONTENT_STOP_WORDS - set(_NEGATION)
                     - _QUESTION_WORDS)


@functools.lru_cache(maxsize=1)
def load_pipeline():
    """(tokenizer pipeline, lemma table), built once per process from installed packages only."""
    try:
        import spacy
        from spacy.lookups import load_lookups
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError("text_to_gloss needs spaCy: pip install spacy spacy-lookups-data") from exc
    try:
        table = load_lookups("en", ["lemma_lookup"]).get_table("lemma_lookup")
    except (ValueError, KeyError) as exc:
        raise RuntimeError("the English lemma table of spacy-lookups-data is missing: "
                           "pip install spacy-lookups-data") from exc
    return spacy.blank("en"), table


def gloss_library() -> str:
    """Versions of the libraries whose tokenizer, stop words and tables decide the glosses (for the spec)."""
    return f"spacy {version('spacy')}, spacy-lookups-data {version('spacy-lookups-data')}"


def text_to_gloss(text: str) -> list[str]:
    """Gloss tokens of an English text, in text order (rules in the module docstring).

    "The dogs are running in the park." -> ["DOG", "RUN", "PARK"]
    """
    if not isinstance(text, str):
        raise TypeError(f"text_to_gloss expects a str, got {type(text).__name__}: {text!r:.80}")
    if not text.strip():
        return []
    nlp, table = load_pipeline()
    doc = nlp.make_doc(text)
    glosses = []
    for token in doc:
        gloss = _gloss_of(token, table)
        if gloss:
            glosses.append(gloss)
    return glosses


def _gloss_of(token, table) -> str | None:
    text = token.text
    if not any(c.isalnum() for c in text):
        return None
    if token.like_num:
        return text.upper()
    lower, norm = token.lower_, token.norm_
    if norm in _NEGATION or lower in _NEGATION:
        return _NEGATION.get(norm) or _NEGATION[lower]
    if lower in _QUESTION_WORDS:
        return lower.upper()
    function_words = _function_words()
    if lower in function_words or norm in function_words:
        return None
    if _is_name(token):
        return text.upper()
    lemma = _LEMMA_FIXES.get(lower) or table.get(lower, lower)
    return None if lemma in function_words else lemma.upper()


def _is_name(token) -> bool:
    text = token.text
    if not (text[0].isupper() and any(c.islower() for c in text[1:])):
        return False
    if token.i == 0:
        return False
    previous = token.doc[token.i - 1]
    return previous.text in _MID_SENTENCE_PUNCT or any(c.isalnum() for c in previous.text)


def gloss_bleu(hypotheses: list[list[str]], references: list[list[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_n over gloss tokens, one reference per hypothesis, in [0, 1].

    BLEU-n is the cumulative score (geometric mean of the 1..n-gram precisions, clipped counts summed over the
    corpus, times the corpus brevity penalty), without smoothing, as in Papineni et al. and the sign-language
    translation papers. Computed by sacrebleu on the space-joined tokens with its tokenizer off, so the tokens
    are compared exactly as given.
    """
    from sacrebleu.metrics import BLEU

    _check_corpus(hypotheses, references, max_n)
    hyps = [" ".join(tokens) for tokens in hypotheses]
    refs = [[" ".join(tokens) for tokens in references]]
    scores = {}
    for n in range(1, max_n + 1):
        bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, effective_order=False)
        score = bleu.corpus_score(hyps, refs).score / 100.0
        scores[f"BLEU-{n}"] = min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0
    return scores


def _check_corpus(hypotheses: list[list[str]], references: list[list[str]], max_n: int) -> None:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: one reference each")
    if not hypotheses:
        raise ValueError("gloss_bleu needs at least one hypothesis")
    for what, corpus in (("hypothesis", hypotheses), ("reference", references)):
        for i, tokens in enumerate(corpus):
            if isinstance(tokens, str) or not all(isinstance(t, str) and t and not any(c.isspace() for c in t)
                                                  for t in tokens):
                raise ValueError(f"{what} {i} must be a list of non-empty gloss tokens without whitespace, "
                                 f"got {tokens!r:.120}")
