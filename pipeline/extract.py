"""The extract job: manifest -> every configured feature set in the store, resumable and failure-tolerant."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from avcache.features.checkpoints import load_profile
from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore, StoreError
from avcache.pipeline.config import ExtractConfig
from avcache.pipeline.extractors import Context, Extractor, get_extractor, ordered
from avcache.pipeline.manifest import failures_path_for, read_failures, read_manifest
from avcache.pipeline.progress import Progress
from avcache.pipeline.stages import WriteShard


@dataclass
class FeatureSetReport:
    name: str
    selected: int = 0
    already_done: int = 0
    written: int = 0
    failed: int = 0
    seconds: float = 0.0


@dataclass
class ExtractReport:
    store: str
    runner: str
    feature_sets: list[FeatureSetReport] = field(default_factory=list)
    manifest_failures: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.manifest_failures + sum(r.failed for r in self.feature_sets)


def extract(manifest_path: str | Path, store_root: str | Path, config: ExtractConfig, runner, log=print) -> ExtractReport:
    start = time.monotonic()
    manifest_path, store_root = Path(manifest_path), Path(store_root)
    manifest = read_manifest(manifest_path)
    store_root.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(store_root)
    store.write_items(manifest)  # the store carries its items: trainers find them wherever it is copied
    report = ExtractReport(store=str(store_root), runner=runner.name)

    failures_file = failures_path_for(manifest_path)
    if failures_file.is_file():
        rows = read_failures(failures_file).to_pylist()
        store.write_failures("manifest", rows)
        report.manifest_failures = len(rows)

    gpus = runner.cluster_gpus()
    gpus_per_actor = config.ray.gpus_per_actor
    num_gpus = (1.0 if gpus > 0 else 0.0) if gpus_per_actor == "auto" else float(gpus_per_actor)
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=manifest, store=store, num_gpus=num_gpus)
    for name in ordered(config.feature_sets):
        report.feature_sets.append(_extract_feature_set(get_extractor(name), ctx, runner, manifest_path, log))
    report.seconds = time.monotonic() - start
    return report


def _extract_feature_set(extractor: Extractor, ctx: Context, runner, manifest_path: Path, log) -> FeatureSetReport:
    start = time.monotonic()
    result = FeatureSetReport(extractor.name)
    spec = extractor.spec(ctx)  # before any work, so a mismatching store is refused up front
    provenance = {"manifest": str(manifest_path.resolve()), "profile": ctx.config.profile,
                  "encoders": ctx.profile, "config": ctx.config.to_dict()}
    # Opened before any work goes out: opening removes the shard files a killed job left unlisted, which must not
    # race with workers writing this job's shards.
    with FeatureSetWriter(ctx.store.root, spec, rows_per_shard=ctx.config.rows_per_shard, provenance=provenance) as writer:
        rows = extractor.select(ctx)
        done = writer.committed_ids()
        pending = [row for row in rows if row["item_id"] not in done]
        result.selected, result.already_done = len(rows), len(rows) - len(pending)
        failures: list[dict] = []
        if pending:
            progress = Progress(extractor.name, len(pending))
            paths = {row["item_id"]: row["path"] for row in pending}
            stages = [*extractor.build_stages(ctx), _write_stage(extractor, spec, writer, ctx.config.rows_per_shard)]
            for batch in runner.run(pending, stages):
                written, failed = _commit_batch(batch, writer, paths, failures)
                result.written += written
                result.failed += failed
                progress.update(written + failed, failed)
            progress.finish()
        else:
            log(f"{extractor.name}: all {len(rows)} items already in the store, nothing to do")
    ctx.store.write_failures(extractor.name, failures)
    result.seconds = time.monotonic() - start
    return result


def _write_stage(extractor: Extractor, spec: FeatureSetSpec, writer: FeatureSetWriter,
                 rows_per_shard: int) -> WriteShard:
    """The stage that writes shards where the rows are, with exactly the declared columns: the scalars converted
    to their declared dtypes, the vectors and sequences the spec holds (an optional vector the encoder lacks is
    not). An absolute folder: workers on other nodes (or with another working directory) must find it."""
    return WriteShard(str(writer.path.resolve()), spec, extractor.scalars, writer.scalar_types(), writer.code_version,
                      batch_size=rows_per_shard)


def _write_batch(batch: dict, extractor: Extractor, spec: FeatureSetSpec, writer: FeatureSetWriter,
                 failures: list[dict]) -> tuple[int, int]:
    """A batch of computed rows written from this process as one shard (the write stage run here) and committed;
    -> (items written, failed). The job itself runs the write stage on the workers."""
    stage = _write_stage(extractor, spec, writer, max(1, len(batch["item_id"])))
    paths = {item_id: str(path) for item_id, path in zip(batch["item_id"], batch["path"])}
    return _commit_batch(stage.process(batch), writer, paths, failures)


def _commit_batch(batch: dict, writer: FeatureSetWriter, paths: dict, failures: list[dict]) -> tuple[int, int]:
    """Commit the shard records of a WriteShard batch and collect its failure rows; -> (items written, failed).
    A record the writer refuses (a foreign spec, an item already committed, a file gone) fails its items."""
    written = failed = 0
    for i, item_id in enumerate(batch["item_id"]):
        if batch["record"][i]:
            record = json.loads(batch["record"][i])
            try:
                writer.commit(record)
                written += record["rows"]
            except StoreError as exc:
                failures.extend({"item_id": refused, "path": str(paths.get(refused, "")), "stage": "store",
                                 "reason": str(exc)} for refused in record["item_ids"])
                failed += record["rows"]
            continue
        failures.append({"item_id": item_id, "path": str(batch["path"][i]), "stage": batch["stage"][i],
                         "reason": batch["reason"][i]})
        failed += 1
    return written, failed
