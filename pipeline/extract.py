"""The extract job: manifest -> every configured feature set in the store, resumable and failure-tolerant."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avcache.features.checkpoints import load_profile
from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore, StoreError
from avcache.pipeline.config import ExtractConfig
from avcache.pipeline.extractors import Context, Extractor, get_extractor, ordered
from avcache.pipeline.manifest import failures_path_for, read_failures, read_manifest
from avcache.pipeline.progress import Progress
from avcache.pipeline.stages import PENDING, ForFeatureSet, WriteFeatureSets, WriteShard, one_clip_per_job, set_column


@dataclass
class FeatureSetReport:
    name: str
    selected: int = 0
    already_done: int = 0
    written: int = 0
    failed: int = 0
    seconds: float = 0.0               # the wall time of its pass, shared with the sets in `pass_with`
    pass_with: tuple[str, ...] = ()    # the other feature sets decoded in the same pass


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
    order = ordered(config.feature_sets)
    with one_clip_per_job():  # in-process runners load CLIP once for all its passes
        for extractors in plan_passes(order, ctx):
            report.feature_sets.extend(_extract_pass(extractors, ctx, runner, manifest_path, log))
    report.feature_sets.sort(key=lambda r: order.index(r.name))  # reported in config order, as before
    report.seconds = time.monotonic() - start
    return report


def plan_passes(names: list[str], ctx: Context) -> list[list[Extractor]]:
    """The feature sets `names` (already `ordered`) as passes over the manifest, run in turn: a set whose first
    stage is the same decoder as a pass's (class and arguments equal) joins it, and a set without a decoder (text,
    vocabulary, glosses) joins the first pass of sets without one, unless a set it reads from the store runs in or
    after that pass; any other set is a pass of its own. Passes keep `ordered`'s order. Sets without a decoder
    share nothing but the pass (each runs its stages on its own rows): one job instead of one each, which under
    Ray is one round of actor start-up (about 12 s a pass on 2 cores) instead of one per set."""
    passes: list[list[Extractor]] = []
    decoders: list = []  # each pass's shared decoder, None for a pass of sets without one
    placed: dict[str, int] = {}
    for name in names:
        extractor = get_extractor(name)
        decoder = extractor.decoder(ctx)
        earliest = max((placed[d] + 1 for d in extractor.after if d in placed), default=0)
        joins = [i for i in range(earliest, len(passes)) if decoders[i] == decoder]
        if joins:
            passes[joins[0]].append(extractor)
        else:
            passes.append([extractor])
            decoders.append(decoder)
        placed[name] = joins[0] if joins else len(passes) - 1
    return passes


@dataclass
class _Member:
    """One feature set of a pass: its writer, the selected rows it still lacks, what it failed and its report."""

    extractor: Extractor
    writer: FeatureSetWriter
    pending: list[dict]
    result: FeatureSetReport
    failures: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.extractor.name


def _extract_pass(extractors: list[Extractor], ctx: Context, runner, manifest_path: Path,
                  log) -> list[FeatureSetReport]:
    """One pass over the manifest for the feature sets `extractors` (one decoder, each set's encoders, each set's
    shard writer); the driver commits each set's records to that set's writer. -> one report per set."""
    start = time.monotonic()
    specs = [extractor.spec(ctx) for extractor in extractors]  # before any work: a mismatching store is refused
    provenance = {"manifest": str(manifest_path.resolve()), "profile": ctx.config.profile,
                  "encoders": ctx.profile, "config": ctx.config.to_dict()}
    members: list[_Member] = []
    with contextlib.ExitStack() as stack:
        for extractor, spec in zip(extractors, specs):
            # Opened before any work goes out: opening removes the shard files a killed job left unlisted, which
            # must not race with workers writing this job's shards.
            writer = stack.enter_context(FeatureSetWriter(
                ctx.store.root, spec, rows_per_shard=ctx.config.rows_per_shard, provenance=provenance))
            rows = extractor.select(ctx)
            done = writer.committed_ids()
            pending = [row for row in rows if row["item_id"] not in done]
            result = FeatureSetReport(extractor.name, selected=len(rows), already_done=len(rows) - len(pending))
            members.append(_Member(extractor, writer, pending, result))
            if not pending:
                log(f"{extractor.name}: all {len(rows)} items already in the store, nothing to do")
        if any(member.pending for member in members):
            _run_pass(members, specs, ctx, runner)
    for member in members:
        ctx.store.write_failures(member.name, member.failures)
        member.result.seconds = time.monotonic() - start  # the pass's time: its sets ran together
        member.result.pass_with = tuple(m.name for m in members if m is not member)
    return [member.result for member in members]


def _run_pass(members: list[_Member], specs: list[FeatureSetSpec], ctx: Context, runner) -> None:
    rows = _pass_rows(members)
    stages = _pass_stages(members, specs, ctx)
    paths = {m.name: {row["item_id"]: row["path"] for row in m.pending} for m in members}
    progress = Progress("+".join(m.name for m in members), sum(len(m.pending) for m in members))
    for batch in runner.run(rows, stages):
        for member in members:
            part = _rows_for(batch, member.name)
            if not part["item_id"]:
                continue
            written, failed = _commit_batch(part, member.writer, paths[member.name], member.failures)
            member.result.written += written
            member.result.failed += failed
            progress.update(written + failed, failed)
    progress.finish()


def _pass_stages(members: list[_Member], specs: list[FeatureSetSpec], ctx: Context) -> list:
    """The shared decoder (when the sets have one), each set's own stages in turn, then every set's writer."""
    built = [member.extractor.build_stages(ctx) for member in members]
    shared = members[0].extractor.decoder(ctx) is not None
    stages = [built[0][0]] if shared else []
    for member, own in zip(members, built):
        stages += [ForFeatureSet(member.name, stage) for stage in (own[1:] if shared else own)]
    writers = {m.name: _write_stage(m.extractor, spec, m.writer, ctx.config.rows_per_shard)
               for m, spec in zip(members, specs)}
    return [*stages, WriteFeatureSets(writers, batch_size=ctx.config.rows_per_shard)]


def _pass_rows(members: list[_Member]) -> list[dict]:
    """One row per item pending in any set of the pass, with PENDING naming those sets. The shared fields are the
    first selecting set's row; a field whose value differs in another set's row (or that only it has) travels as
    that set's own column, so every set's stages see exactly the row its selection gave."""
    shared: dict[str, dict] = {}
    own: dict[str, dict[str, dict]] = {}  # item_id -> set -> that set's selected row
    for member in members:
        for row in member.pending:
            shared.setdefault(row["item_id"], row)
            own.setdefault(row["item_id"], {})[member.name] = row
    private = sorted({(name, key) for item_id, by_set in own.items() for name, row in by_set.items()
                      if row is not shared[item_id] for key, value in row.items()
                      if key not in shared[item_id] or not _same(value, shared[item_id][key])})
    keys = list(dict.fromkeys(key for row in shared.values() for key in row))
    rows = []
    for item_id, base in shared.items():
        row = {key: base.get(key) for key in keys}  # every row has every column: batches are columns
        for name, key in private:
            row[set_column(name, key)] = own[item_id][name][key] if name in own[item_id] else None
        row[PENDING] = list(own[item_id])
        rows.append(row)
    return rows


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # values without a plain equality count as different: kept per set
        return False


def _rows_for(batch: dict, feature_set: str) -> dict:
    """The rows of a WriteFeatureSets batch that belong to `feature_set`."""
    rows = [i for i, name in enumerate(batch["feature_set"]) if name == feature_set]
    return {key: [values[i] for i in rows] for key, values in batch.items()}


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
