"""Retrieval metrics against a brute-force reference, the pessimistic tie rule, their random-ranking chance level
against an enumeration of every ranking and a seeded simulation, and the zero-shot eval on a store."""
from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from avcache.eval.retrieval import (cross_modal_retrieval, random_cross_modal, random_ranking_metrics,
                                    retrieval_markdown, retrieval_metrics)
from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore, StoreError
from avcache.pipeline.manifest import write_manifest
from avcache.train.zeroshot import evaluate_zeroshot, run_eval_retrieval

KEYS = ("R@1", "R@5", "R@10", "MRR", "median_rank", "mean_rank", "queries")


# ----------------------------------------------------------------------------------------------------------------
# brute-force reference: full matrix, one query at a time, the tie rule spelled out


def ref_normalise(x):
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)


def ref_summary(ranks, prefix):
    ranks = np.asarray(ranks, np.float64)
    out = {f"{prefix}_R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_MRR"] = sum(1 / r for r in ranks) / len(ranks)
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = sum(ranks) / len(ranks)
    out[f"{prefix}_queries"] = len(ranks)
    return out


def ref_ranks(captions, images, caption_image):
    sim = ref_normalise(captions) @ ref_normalise(images).T  # (Nc, Ni), all of it
    s2i = []
    for c in range(len(captions)):
        own = sim[c, caption_image[c]]
        s2i.append(1 + sum(1 for j in range(len(images)) if j != caption_image[c] and sim[c, j] >= own))
    i2s = []
    for i in range(len(images)):
        mine = [c for c in range(len(captions)) if caption_image[c] == i]
        if not mine:
            continue  # no caption: not a query (it stays an s2i distractor)
        best = max(sim[c, i] for c in mine)
        i2s.append(1 + sum(1 for c in range(len(captions)) if caption_image[c] != i and sim[c, i] >= best))
    return s2i, i2s


def reference(captions, images, caption_image):
    s2i, i2s = ref_ranks(captions, images, caption_image)
    return {**ref_summary(s2i, "s2i"), **ref_summary(i2s, "i2s")}


def assert_same(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if key.endswith(("MRR", "mean_rank")):  # summation order differs
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key
        else:
            assert got[key] == value, key


def counts_to_owner(counts, rng):
    owner = np.repeat(np.arange(len(counts)), counts)
    return rng.permutation(owner)  # captions of one image are not adjacent


def quantised(rng, n, d=16):
    # entries ±1/sqrt(d), d a power of 4: exactly unit norm and every dot product exact, so ties are real ties
    return rng.choice(np.array([-1, 1], np.float32) / np.sqrt(d, dtype=np.float32), size=(n, d))


# ----------------------------------------------------------------------------------------------------------------
# against the reference


CASES = [  # (seed, n_images, captions per image (int or "var"), dim, chunk_size)
    (0, 7, 1, 8, 3),
    (1, 20, 5, 16, 7),
    (2, 30, "var", 12, 4),
    (3, 13, 5, 32, 1024),
    (4, 9, "var", 6, 1),
]


@pytest.mark.parametrize("seed,n_images,per_image,dim,chunk", CASES)
def test_matches_reference_random(seed, n_images, per_image, dim, chunk):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 7, n_images) if per_image == "var" else np.full(n_images, per_image)
    if per_image == "var":
        counts[:2] = 0  # images with no caption
    owner = counts_to_owner(counts, rng)
    images = rng.standard_normal((n_images, dim))
    captions = images[owner] + 1.5 * rng.standard_normal((len(owner), dim))  # noisy: ranks spread out
    got = cross_modal_retrieval(captions, images, owner, chunk_size=chunk)
    want = reference(captions, images, owner)
    assert_same(got, want)
    assert got["i2s_queries"] == int((counts > 0).sum()) and got["s2i_queries"] == len(owner)
    assert 0 < got["s2i_R@1"] < 1  # the data is neither trivial nor hopeless


@pytest.mark.parametrize("seed,chunk", [(10, 5), (11, 3), (12, 64)])
def test_matches_reference_with_many_ties(seed, chunk):
    rng = np.random.default_rng(seed)
    n_images = 24
    counts = rng.integers(0, 5, n_images)
    images = quantised(rng, n_images, d=4)  # only 16 distinct images: many duplicates
    images[5] = images[3]
    owner = counts_to_owner(counts, rng)
    captions = quantised(rng, len(owner), d=4)
    got = cross_modal_retrieval(captions, images, owner, chunk_size=chunk)
    want = reference(captions, images, owner)
    assert_same(got, want)
    assert len(set(np.round(captions @ images.T, 6).ravel())) <= 5  # scores take a handful of values


def test_single_direction_matches_reference():
    rng = np.random.default_rng(20)
    gallery = quantised(rng, 40)
    query = quantised(rng, 70)
    target = rng.integers(0, 40, 70)
    got = retrieval_metrics(query, gallery, target, chunk_size=9)
    s2i, _ = ref_ranks(query, gallery, target)
    assert_same({f"x_{k}": v for k, v in got.items()}, ref_summary(s2i, "x"))
    assert set(got) == set(KEYS)
    assert set(retrieval_metrics(query, gallery, target, prefix="t2i")) == {f"t2i_{k}" for k in KEYS}


# ----------------------------------------------------------------------------------------------------------------
# ties by hand


def test_pessimistic_ties_by_hand():
    images = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [-1, 0]], np.float32)  # 0 = 1 and 2 = 3: duplicates
    captions = np.array([[1, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    owner = np.array([0, 2, 1, 2])  # images 3 and 4 have no caption
    got = cross_modal_retrieval(captions, images, owner, chunk_size=3)
    # s2i: c0 ties with image 1 -> 2; c1 ties with image 3 -> 2; c2 ties with image 0 -> 2;
    #      c3 scores .707 against images 0..3 (all equal) -> 4 (image 4 scores -.707)
    assert got["s2i_queries"] == 4
    assert got["s2i_R@1"] == 0.0 and got["s2i_R@5"] == 1.0 and got["s2i_R@10"] == 1.0
    assert got["s2i_MRR"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2 + 1 / 4) / 4)
    assert got["s2i_median_rank"] == 2.0 and got["s2i_mean_rank"] == 2.5
    # i2s (images 0, 1, 2 only): image 0 best own c0 = 1, c2 ties -> 2; image 1 best own c2 = 1, c0 ties -> 2;
    #      image 2 best own c1 = 1 (c3 = .707 is its own too), no other caption reaches 1 -> 1
    assert got["i2s_queries"] == 3
    assert got["i2s_R@1"] == pytest.approx(1 / 3) and got["i2s_R@5"] == 1.0
    assert got["i2s_MRR"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert got["i2s_median_rank"] == 2.0 and got["i2s_mean_rank"] == pytest.approx(5 / 3)


def test_perfect_retriever():
    images = np.eye(10, 16, dtype=np.float32)
    owner = np.repeat(np.arange(10), 5)
    got = cross_modal_retrieval(3 * images[owner], images, owner, chunk_size=4)  # scale does not matter
    for d in ("s2i", "i2s"):
        assert got[f"{d}_R@1"] == 1.0 and got[f"{d}_MRR"] == 1.0 and got[f"{d}_median_rank"] == 1.0


def test_constant_retriever_gets_the_worst_rank():
    rng = np.random.default_rng(30)
    images = rng.standard_normal((10, 8))
    owner = np.repeat(np.arange(10), 5)
    got = cross_modal_retrieval(np.zeros((50, 8)), images, owner, chunk_size=7)  # every score is 0
    assert got["s2i_median_rank"] == 10 and got["s2i_mean_rank"] == 10
    assert got["s2i_R@1"] == 0.0 and got["s2i_R@5"] == 0.0 and got["s2i_R@10"] == 1.0
    assert got["i2s_median_rank"] == 46 and got["i2s_R@10"] == 0.0  # 45 captions of other images tie
    assert got["i2s_MRR"] == pytest.approx(1 / 46)


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("captions,images,owner,match", [
    (np.ones((3, 4)), np.ones((2, 4)), [0, 1], r"caption_image must have shape \(3,\)"),
    (np.ones((3, 4)), np.ones((2, 5)), [0, 1, 1], "dims differ: 4 vs 5"),
    (np.ones((3, 4)), np.ones((2, 4)), [0, 2, 1], r"outside \[0, 2\)"),
    (np.ones((3, 4)), np.ones((2, 4)), [0, -1, 1], r"outside \[0, 2\)"),
    (np.ones((3, 4)), np.ones((2, 4)), [0.0, 1.0, 1.0], "integer indices"),
    (np.ones((0, 4)), np.ones((2, 4)), [], "captions is empty"),
    (np.ones((3, 4)), np.ones((0, 4)), [0, 0, 0], "images is empty"),
    (np.ones(4), np.ones((2, 4)), [0], "2-D"),
    (np.array([[1, np.nan], [1, 0]]), np.ones((2, 2)), [0, 1], "non-finite"),
    (np.ones((2, 2)), np.array([[np.inf, 0], [1, 0]]), [0, 1], "images has 1 non-finite"),
])
def test_bad_input(captions, images, owner, match):
    with pytest.raises(ValueError, match=match):
        cross_modal_retrieval(captions, images, np.asarray(owner))


def test_bad_chunk_and_prefix():
    with pytest.raises(ValueError, match="chunk_size"):
        cross_modal_retrieval(np.ones((2, 2)), np.ones((2, 2)), np.array([0, 1]), chunk_size=0)
    with pytest.raises(ValueError, match="prefix"):
        cross_modal_retrieval(np.ones((2, 2)), np.ones((2, 2)), np.array([0, 1]), prefix="s2i")
    with pytest.raises(ValueError, match="query_to_gallery"):
        retrieval_metrics(np.ones((2, 2)), np.ones((2, 2)), np.array([0, 5]))


# ----------------------------------------------------------------------------------------------------------------
# chance level: a uniformly random ranking


def enumerated_ranks(gallery_size, correct):
    """The rank of a query with `correct` correct rows in every ordering of the gallery: 1 + the position of its
    first correct row, one entry per permutation."""
    return [1 + min(order.index(i) for i in range(correct))
            for order in itertools.permutations(range(gallery_size))]


@pytest.mark.parametrize("gallery_size,correct_per_query", [(1, [1]), (4, [1, 1]), (5, [2]), (6, [1, 2, 3]),
                                                           (6, [3, 3, 1, 2]), (6, [6]), (7, [2, 5])])
def test_random_ranking_equals_an_enumeration_of_every_ranking(gallery_size, correct_per_query):
    # Every query sees all N! orderings, so pooling them weighs the queries equally: the pooled mean of each
    # metric is its exact expectation, and the pooled median is the median of the queries' mixed distribution.
    ranks = np.array([r for c in correct_per_query for r in enumerated_ranks(gallery_size, c)], np.float64)
    expected = {f"R@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    expected.update(MRR=float(np.mean(1 / ranks)), median_rank=float(np.median(ranks)), mean_rank=float(np.mean(ranks)),
                    queries=len(correct_per_query))
    got = random_ranking_metrics(gallery_size, correct_per_query)
    assert list(got) == list(KEYS)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 1000])
def test_one_correct_row_gives_the_closed_forms(n):
    got = random_ranking_metrics(n, np.ones(3, np.int64), prefix="random_s2i")
    for k in (1, 5, 10):
        assert got[f"random_s2i_R@{k}"] == min(k, n) / n  # exactly: the fractions are exact
    assert got["random_s2i_MRR"] == pytest.approx(sum(Fraction(1, i) for i in range(1, n + 1)) / n, rel=1e-12)
    assert got["random_s2i_mean_rank"] == got["random_s2i_median_rank"] == (n + 1) / 2
    assert got["random_s2i_queries"] == 3


def test_random_cross_modal_equals_a_seeded_simulation_of_the_metrics():
    """Embeddings drawn i.i.d. at random rank every gallery uniformly at random; averaged over many draws, the
    metrics `cross_modal_retrieval` computes converge to `random_cross_modal`'s expectations. Image 4 has no caption
    (a distractor in the speech->image gallery), the others 1 to 3 (image->speech: several correct rows)."""
    caption_image = np.array([0, 0, 1, 2, 2, 2, 3])
    expected = random_cross_modal(caption_image, 5, prefix=("s2i", "i2s"))
    rng = np.random.default_rng(0)
    draws = [cross_modal_retrieval(rng.standard_normal((7, 8)), rng.standard_normal((5, 8)), caption_image)
             for _ in range(3000)]
    for key, value in expected.items():
        if key.endswith("median_rank"):  # a median of 7 (or 4) ranks does not average to the distribution's median
            continue
        mean = float(np.mean([d[key] for d in draws]))
        assert mean == pytest.approx(value, abs=0.1 if key.endswith("mean_rank") else 0.02), key
    # several correct rows: image->speech R@1 is the mean of c/Nc over the images with captions, not 1/Nc
    assert expected["i2s_R@1"] == pytest.approx((2 / 7 + 1 / 7 + 3 / 7 + 1 / 7) / 4)
    assert expected["s2i_R@1"] == 1 / 5 and expected["s2i_queries"] == 7 and expected["i2s_queries"] == 4


def test_random_ranking_bad_input():
    with pytest.raises(ValueError, match="gallery_size must be a positive int"):
        random_ranking_metrics(0, [1])
    with pytest.raises(ValueError, match=r"correct_per_query must lie in \[1, 3\]"):
        random_ranking_metrics(3, [1, 4])
    with pytest.raises(ValueError, match="non-empty 1-D integer array"):
        random_ranking_metrics(3, [0.5])
    with pytest.raises(ValueError, match="images must be a positive int"):
        random_cross_modal(np.array([0]), 0)
    with pytest.raises(ValueError, match="outside"):
        random_cross_modal(np.array([0, 3]), 2)


# ----------------------------------------------------------------------------------------------------------------
# zero-shot evaluation on a hand-built store


DIM = 6
ENCODER = {"name": "open_clip", "model": "tiny", "checkpoint_sha256": "abc"}


def e(i):
    return np.eye(DIM, dtype=np.float32)[i]


def write_set(root, name, vectors: dict, manifest=None, encoder=ENCODER):
    spec = FeatureSetSpec(name=name, extractor=name, encoder=encoder, preprocessing={"image_size": 32},
                          vectors={"embedding": DIM})
    provenance = {"manifest": str(manifest)} if manifest else None
    with FeatureSetWriter(root, spec, rows_per_shard=3, provenance=provenance) as w:
        for item_id, vec in vectors.items():
            w.add(item_id, vectors={"embedding": vec})


def row(item_id, group, split="test", dataset="flickr8k_audio", audio=True, image=True):
    return {"item_id": item_id, "dataset": dataset, "split": split, "group_id": group,
            "audio_path": f"/wav/{item_id}.wav" if audio else None,
            "image_path": f"/img/{group}.jpg" if image else None,
            "texts": [f"caption {item_id}"], "text_kinds": ["caption"]}


@pytest.fixture
def store(tmp_path):
    """Images A, B, C (+ D whose image failed); two captions each; known embeddings.

    Image A is e0, B e1, C e2. Ground-truth captions embed as their own image. Transcripts: A's and B's are right,
    c1 looks like A (e0), c2 failed. a2's image row is junk (e5): the gallery must take a1, the group's first item.
    """
    manifest = tmp_path / "manifest.arrow"
    items = write_manifest([
        row("f:a1", "A"), row("f:a2", "A"), row("f:b1", "B"), row("f:b2", "B"), row("f:c1", "C"), row("f:c2", "C"),
        row("f:d1", "D"),
        row("f:a3", "A", split="train"), row("f:x1", "X", audio=False), row("f:y1", "Y", image=False),
        row("s:a1", "A", dataset="spokencoco"),
    ], manifest)
    root = tmp_path / "store"
    write_set(root, "clip_image", {"f:a1": e(0), "f:a2": e(5), "f:b2": e(1), "f:c1": e(2), "f:c2": e(2),
                                   "f:a3": e(3), "f:x1": e(3), "s:a1": e(4)}, manifest)
    write_set(root, "clip_text", {"f:a1": e(0), "f:a2": e(0), "f:b1": e(1), "f:b2": e(1), "f:c1": e(2),
                                  "f:c2": e(2), "f:d1": e(3), "s:a1": e(4)})
    write_set(root, "clip_transcript", {"f:a1": e(0), "f:a2": e(0), "f:b1": e(1), "f:b2": e(1), "f:c1": e(0),
                                        "f:d1": e(3), "s:a1": e(4)})
    FeatureStore(root).write_items(items)  # as extract does
    return root, manifest


def test_evaluate_zeroshot_exact(store):
    root, _ = store
    r = evaluate_zeroshot(root, dataset="flickr8k_audio", chunk_size=2)
    assert r["images"] == 3 and r["images_missing"] == 1  # D has no clip_image row
    assert r["captions"] == 6 and r["captions_without_image"] == 1
    assert r["textupper_missing"] == 0 and r["zeroshot_missing"] == 1
    for d in ("s2i", "i2s"):
        assert r[f"textupper_{d}_R@1"] == 1.0 and r[f"textupper_{d}_MRR"] == 1.0
    # zeroshot s2i: a1 a2 b1 b2 rank 1; c1 (e0) scores A 1 > C 0 = B 0 -> rank 3
    assert r["zeroshot_s2i_queries"] == 5
    assert r["zeroshot_s2i_R@1"] == pytest.approx(0.8) and r["zeroshot_s2i_R@5"] == 1.0
    assert r["zeroshot_s2i_MRR"] == pytest.approx((4 + 1 / 3) / 5)
    assert r["zeroshot_s2i_median_rank"] == 1.0 and r["zeroshot_s2i_mean_rank"] == pytest.approx(7 / 5)
    # zeroshot i2s: A ties with c1 -> 2; B -> 1; C's own c1 scores 0, as do a1 a2 b1 b2 -> 5
    assert r["zeroshot_i2s_queries"] == 3
    assert r["zeroshot_i2s_R@1"] == pytest.approx(1 / 3) and r["zeroshot_i2s_R@5"] == 1.0
    assert r["zeroshot_i2s_MRR"] == pytest.approx((1 / 2 + 1 + 1 / 5) / 3)
    assert r["zeroshot_i2s_median_rank"] == 2.0
    # chance: 3 images, 6 captions (2 per image; as selected, c2's missing transcript notwithstanding)
    assert r["random_s2i_R@1"] == 1 / 3 and r["random_s2i_R@5"] == 1.0 and r["random_s2i_queries"] == 6
    assert r["random_s2i_MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3) and r["random_s2i_mean_rank"] == 2.0
    assert r["random_i2s_R@1"] == pytest.approx(1 - 10 / 15)  # no own caption first: C(5, 2) / C(6, 2)
    assert r["random_i2s_mean_rank"] == pytest.approx(7 / 3) and r["random_i2s_queries"] == 3


def test_evaluate_zeroshot_all_datasets_keys_images_by_dataset(store):
    root, manifest = store
    r = evaluate_zeroshot(root, manifest=manifest)
    assert r["images"] == 4 and r["captions"] == 7  # spokencoco's group "A" is another image
    assert r["textupper_s2i_R@1"] == 1.0 and r["zeroshot_s2i_queries"] == 6


def test_run_eval_retrieval_writes_report(store, tmp_path, capsys):
    root, _ = store
    out = tmp_path / "out"
    r = run_eval_retrieval(root, out, dataset="flickr8k_audio")
    saved = json.loads((out / "results.json").read_text())
    assert saved == r
    assert all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               for k, v in saved.items())
    md = (out / "results.md").read_text()
    assert md == retrieval_markdown(r) and md in capsys.readouterr().out
    assert "pipeline (Whisper → CLIP text)" in md and "text upper bound (ground-truth captions)" in md
    assert "| random ranking (chance) | 6 / 3 | 33.3 | 100.0 | 100.0 | 33.3 | 100.0 | 100.0 |" in md
    assert "| 80.0 |" in md
    assert (out / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zeroshot_errors(store, tmp_path):
    root, manifest = store
    with pytest.raises(ValueError, match="no manifest rows of split 'val'"):
        evaluate_zeroshot(root, split="val")
    with pytest.raises(ValueError, match="cannot read .*nope.arrow"):
        evaluate_zeroshot(root, manifest=tmp_path / "nope.arrow")

    bare = tmp_path / "bare"
    write_set(bare, "clip_image", {"f:a1": e(0)})  # no provenance
    with pytest.raises(ValueError, match=r"lacks feature set\(s\) \['clip_transcript', 'clip_text'\].*"
                                         r"--feature-sets whisper,clip_transcript,clip_text"):
        evaluate_zeroshot(bare)
    write_set(bare, "clip_text", {"f:a1": e(0)})
    write_set(bare, "clip_transcript", {"f:zz": e(0)})
    with pytest.raises(StoreError, match=r"no items\.arrow: the store was written before stores carried their items"):
        evaluate_zeroshot(bare)
    with pytest.raises(ValueError, match="none of the 2 selected captions is in 'clip_transcript'"):
        evaluate_zeroshot(bare, manifest=manifest, dataset="flickr8k_audio")

    other = tmp_path / "other"
    write_set(other, "clip_image", {"f:a1": e(0)}, manifest)
    write_set(other, "clip_text", {"f:a1": e(0)}, encoder={**ENCODER, "checkpoint_sha256": "zzz"})
    write_set(other, "clip_transcript", {"f:a1": e(0)})
    with pytest.raises(ValueError, match="different CLIP encoders"):
        evaluate_zeroshot(other)
