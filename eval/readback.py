"""Read a store back through the reader (checksums, vectors, one sequence per column) and describe it."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from avcache.eval.markdown import code_span, escape_markdown
from avcache.features.store import FeatureStore


def read_back(store_root: str | Path, verify: bool = True) -> dict:
    store = FeatureStore(store_root)
    feature_sets = []
    for summary in store.summary():
        fs = store[summary["name"]]
        if verify:
            fs.verify()
        vector_shapes = {col: list(fs.vectors(col).shape) for col in fs.spec.vectors}
        sequence_shapes = {}
        if len(fs):
            first = fs.item_ids[0]
            sequence_shapes = {col: list(np.asarray(fs.sequence(first, col)).shape) for col in fs.spec.sequences}
        feature_sets.append({**summary, "vector_shapes": vector_shapes, "first_item": fs.item_ids[0] if len(fs) else None,
                             "first_sequences": sequence_shapes, "encoder_model": fs.spec.encoder.get("model"),
                             "checkpoint_sha256": fs.spec.encoder.get("checkpoint_sha256"), "verified": verify})
        fs.close()
    failures = store.failures().to_pylist()
    return {"store": str(Path(store_root).resolve()), "feature_sets": feature_sets, "failures": failures,
            "failures_by_set": dict(Counter(f["feature_set"] for f in failures))}


def readback_markdown(result: dict) -> str:
    lines = [f"Store: `{result['store']}`", "",
             "| feature set | rows | vectors (N x D) | sequences (first item) | dtype | encoder | MiB | failed |",
             "|---|---:|---|---|---|---|---:|---:|"]
    for fs in result["feature_sets"]:
        vectors = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in fs["vector_shapes"].items())
        sequences = ", ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in fs["first_sequences"].items())
        encoder = f"{fs['encoder']}:{fs['encoder_model']}" if fs["encoder_model"] else fs["encoder"]
        failed = result["failures_by_set"].get(fs["name"], 0)
        lines.append(f"| {fs['name']} | {fs['rows']} | {vectors} | {sequences or '-'} | {fs['dtype']} | {encoder} "
                     f"| {fs['bytes'] / 2**20:.2f} | {failed} |")
    if result["failures"]:
        lines += ["", f"{len(result['failures'])} failed items (first 10):", ""]
        # ids and reasons quote dataset text (file names, lines): escaped, so they show as written
        lines += [f"- {code_span(f['item_id'])} [{f['feature_set']}/{f['stage']}]: {escape_markdown(f['reason'])}"
                  for f in result["failures"][:10]]
    return "\n".join(lines)
