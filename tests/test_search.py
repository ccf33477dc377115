"""`avcache search` on a store extracted from the synthetic set: queries are embedded by the store's own encoders
(so a stored item's caption, image or spoken caption lands exactly on its stored vector), results carry media
paths, and misuse gets one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from avcache.features.index import update_index
from avcache.features.store import FeatureStore, StoreError
from avcache.pipeline.manifest import read_manifest
from avcache.pipeline.search import QueryEncoder, Query, read_queries, search


@pytest.fixture(scope="module")
def indexed_store(spoken_caption_store):
    root = spoken_caption_store
    store = FeatureStore(root / "store")
    for name in ("clip_image", "clip_text", "clip_transcript", "whisper"):
        update_index(store[name], "embedding", log=lambda *a: None)
    flickr = read_manifest(root / "manifest.arrow").to_pylist()
    return root, store, flickr


def test_an_image_query_finds_its_own_image_first(indexed_store):
    root, store, flickr = indexed_store
    row = flickr[0]
    [answer] = search(root / "store", [Query("image", row["image_path"])], k=3, distinct=True)
    top = answer.hits[0]
    assert top.media["image_path"] == row["image_path"] and top.score == pytest.approx(1.0, abs=1e-4)
    # distinct: every caption of an image is an item of clip_image, but one image is listed once
    assert len({h.media["image_path"] for h in answer.hits}) == len(answer.hits) == 3


def test_text_and_audio_queries_land_on_the_stored_vectors(indexed_store):
    root, store, flickr = indexed_store
    row = flickr[1]
    encoder = QueryEncoder(store, store["clip_image"])
    vectors, transcripts = encoder.encode([Query("text", row["texts"][0]), Query("audio", row["audio_path"])])
    np.testing.assert_allclose(vectors[0], store["clip_text"].vectors("embedding", [row["item_id"]])[0], atol=1e-5)
    # The audio query goes through the same Whisper and CLIP text tower as the pipeline channel of the store.
    assert transcripts == [None, store["whisper"].row(row["item_id"])["transcript"]]
    np.testing.assert_allclose(vectors[1], store["clip_transcript"].vectors("embedding", [row["item_id"]])[0],
                               atol=1e-5)
    [answer] = search(root / "store", [Query("text", row["texts"][0])], feature_set="clip_text", k=1)
    assert answer.hits[0].item_id in {r["item_id"] for r in flickr if r["texts"] == row["texts"]}


def test_cli_json_and_batch_queries(indexed_store, tmp_path):
    root, store, flickr = indexed_store
    image = flickr[2]["image_path"]
    (tmp_path / "queries.jsonl").write_text(json.dumps({"text": "a red circle"}) + "\n" + json.dumps({"image": image}) + "\n")
    command = [sys.executable, "-m", "avcache.pipeline.cli", "search", "--store", str(root / "store"),
               "--queries", str(tmp_path / "queries.jsonl"), "-k", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    answers = json.loads(done.stdout)
    assert [a["query"]["kind"] for a in answers] == ["text", "image"]
    assert all(len(a["results"]) == 2 for a in answers)
    assert answers[1]["results"][0]["image_path"] == image and answers[1]["results"][0]["rank"] == 1
    text = subprocess.run(command[:-1], capture_output=True, text=True, check=True).stdout
    assert text.startswith("query 1 [text] a red circle") and f"image={image}" in text


def test_read_queries_formats(tmp_path):
    (tmp_path / "q.txt").write_text("a dog\n\n  a red square \n")
    assert read_queries(tmp_path / "q.txt") == [Query("text", "a dog"), Query("text", "a red square")]
    (tmp_path / "q.jsonl").write_text('{"audio": "clips/a.wav"}\n{"video": "x.mp4"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl line 2: expected exactly one of \('text', 'image', 'audio'\)"):
        read_queries(tmp_path / "q.jsonl")
    (tmp_path / "q.jsonl").write_text('{"audio": "clips/a.wav"}\n')
    assert read_queries(tmp_path / "q.jsonl") == [Query("audio", str(tmp_path / "clips" / "a.wav"))]


def test_misuse_gets_one_line_errors(indexed_store, tmp_path):
    root, store, flickr = indexed_store
    with pytest.raises(ValueError, match="'whisper' was not made by CLIP"):
        search(root / "store", [Query("text", "a dog")], feature_set="whisper")
    with pytest.raises(StoreError, match="no index for clip_image/tag_probs|no vector column 'tag_probs'"):
        search(root / "store", [Query("text", "a dog")], column="tag_probs")
    base = [sys.executable, "-m", "avcache.pipeline.cli", "search", "--store", str(root / "store")]
    for extra, message in ((["--image", str(tmp_path / "none.jpg")], "file not found"),
                           ([], "give a query"),
                           (["--text", "x", "--feature-set", "nope"], "no feature set 'nope'")):
        done = subprocess.run(base + extra, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_cli_eval_retrieval_writes_table_json_and_plot(indexed_store, tmp_path):
    root, store, flickr = indexed_store
    command = [sys.executable, "-m", "avcache.pipeline.cli", "eval-retrieval", "--store", str(root / "store"),
               "--out", str(tmp_path / "eval"), "--split", "train"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    train = [r for r in flickr if r["split"] == "train"]
    assert results["captions"] == len(train) and results["images"] == len({r["group_id"] for r in train})
    assert 0 <= results["zeroshot_s2i_R@1"] <= results["zeroshot_s2i_R@5"] <= 1
    assert results["textupper_i2s_queries"] == results["images"]
    assert "| pipeline (Whisper → CLIP text) |" in done.stdout
    assert (tmp_path / "eval" / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
