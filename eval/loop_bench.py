"""`make bench` against the plain loop a user would write (issue 17): `clip_image` on N JPEGs (640x480, written
here, deterministic) with open_clip ViT-B-32 at full size and seeded random weights (the full-random profile).

- avcache: `pipeline.extract.extract` with feature_sets [clip_image] and profile full-random, into a fresh store
  each run, on the runner `make extract` picks on one machine ("auto": ThreadRunner here) and on RayRunner;
- the loop: a torch DataLoader with one worker (PIL + open_clip's preprocess), batch 32, `encode_image` under
  torch.no_grad, np.save of the (N, 512) array. Same checkpoint file, so the two must agree in value too.

Each run is its own Python process, timed from its start to its exit, as a user runs a script or `make extract`:
imports, the runner's start-up, model loading and shutdown are all in it. Runs alternate (loop, avcache, avcache
on Ray, loop, ...) and the figures are medians. Then, to explain the ratios with measurements, the per-item costs
of each step in this process: JPEG decode, open_clip preprocess (avcache runs it in the decoder, the loop in its
DataLoader worker), the ViT's forward pass on 1 and on every torch thread, and pickling a decoded image (what
crosses between Ray's processes); and the fixed cost of a run on 2 images (start-up, model loading)."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 640, 480
LOOP_BATCH = 32
CLIP_MODEL = "ViT-B-32"
PROFILE = "full-random"


# -- the images -------------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 640x480 JPEGs, identical for identical seeds: smooth colour fields plus noise, so they compress
    like photos (about 50-100 KB) rather than like flat colour."""
    from PIL import Image

    if count < 1:
        raise ValueError(f"loop bench: need at least 1 image, got {count}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:05d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                             Image.BICUBIC)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 3), dtype=np.int16)  # (H, W, 3)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


# -- the two contenders (each runs in a child process) ----------------------------------------------------------


def run_loop(image_dir: Path, checkpoint: str, out_npy: Path) -> dict:
    """The plain loop: DataLoader (1 worker, PIL + preprocess), batch 32, encode_image, np.save."""
    start = time.perf_counter()
    import open_clip
    import torch
    from PIL import Image

    class Images(torch.utils.data.Dataset):
        def __init__(self, paths, preprocess):
            self.paths, self.preprocess = paths, preprocess

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i]) as image:
                return self.preprocess(image.convert("RGB"))  # (3, 224, 224)

    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=checkpoint)
    model.eval()
    loaded = time.perf_counter()
    paths = sorted(image_dir.glob("*.jpg"))
    loader = torch.utils.data.DataLoader(Images(paths, preprocess), batch_size=LOOP_BATCH, num_workers=1)
    chunks = []
    with torch.no_grad():
        for pixels in loader:  # (B, 3, 224, 224)
            chunks.append(model.encode_image(pixels).numpy())  # (B, 512)
    np.save(out_npy, np.concatenate(chunks))
    end = time.perf_counter()
    return {"setup_s": loaded - start, "work_s": end - loaded, "torch_threads": torch.get_num_threads()}


def run_avcache(manifest: Path, store: Path, runner: str) -> dict:
    """avcache's public extract API with the clip_image feature set and the full-random profile, on `runner`."""
    start = time.perf_counter()
    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.runners import make_runner

    config = load_config(overrides=[f"profile={PROFILE}"])
    config.feature_sets = ["clip_image"]
    imported = time.perf_counter()
    chosen = make_runner(runner, config.ray.encoder_actors)
    ready = time.perf_counter()
    report = extract(manifest, store, config, chosen, log=lambda *a: None)
    end = time.perf_counter()
    written = sum(fs.written for fs in report.feature_sets)
    return {"runner": chosen.name, "setup_s": ready - start, "import_s": imported - start,
            "runner_start_s": ready - imported, "work_s": end - ready, "written": written, "failed": report.failed}


def run_child(module: str, mode: str, *args: str) -> dict:
    """One contender in a fresh Python process (`python -m module mode args`); its own phases (last stdout line,
    JSON) plus the whole wall.

    Ray's temporary folder is the child's own: `ray.init()` connects to whatever cluster /tmp/ray names as the
    latest `ray start` (another job's, a multi-node test's), and the bench must start its own, as a user's
    `make extract` does on an idle machine. A short path: Ray's Unix sockets live under it (108 bytes at most)."""
    ray_tmp = tempfile.mkdtemp(prefix="avlb-", dir="/tmp")  # Ray's, when the contender starts one
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, mode, *args], capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", "RAY_TMPDIR": ray_tmp})
    finally:
        wall = time.perf_counter() - start
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module}: the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _child(mode: str, *args: str) -> dict:
    return run_child("avcache.eval.loop_bench", mode, *args)


# -- where the time goes ----------------------------------------------------------------------------------------


def per_item(fn, items: list, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return (time.perf_counter() - start) / (repeat * len(items))


def diagnose(paths: list[Path], checkpoint: str, batch: int = LOOP_BATCH) -> dict:
    """Seconds per item of each step, measured in this process on the first `batch` images."""
    import open_clip
    import torch
    from PIL import Image

    from avcache.features.durable import sha256_of
    from avcache.pipeline.media import load_image

    paths = paths[:batch]
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=checkpoint)
    model.eval()
    decode = per_item(load_image, paths)
    images = [load_image(p) for p in paths]  # (H, W, 3) uint8, what the decode stage sends the encoder
    prep = per_item(lambda im: preprocess(Image.fromarray(im)), images)
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])  # (B, 3, 224, 224)
    threads = torch.get_num_threads()
    encode = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            with torch.no_grad():
                model.encode_image(pixels[:2])  # warm-up at this thread count
                encode[n] = per_item(lambda x: model.encode_image(x), [pixels]) / len(pixels)
    finally:
        torch.set_num_threads(threads)
    pickling = per_item(lambda im: pickle.loads(pickle.dumps(im, protocol=5)), images, repeat=3)
    start = time.perf_counter()
    sha256_of(checkpoint)  # what clip_spec pays once per process (driver and each actor) for a file checkpoint
    hashing = time.perf_counter() - start
    return {"loop_diag_decode_ms": round(decode * 1e3, 2), "loop_diag_preprocess_ms": round(prep * 1e3, 2),
            "loop_diag_encode_ms_1_thread": round(encode[1] * 1e3, 2),
            f"loop_diag_encode_ms_{threads}_threads": round(encode[threads] * 1e3, 2),
            "loop_diag_torch_threads": threads, "loop_diag_pickle_ms": round(pickling * 1e3, 3),
            "loop_diag_decoded_kb": round(images[0].nbytes / 1e3, 1), "loop_diag_sha256_s": round(hashing, 3)}


# -- the bench --------------------------------------------------------------------------------------------------


def _same_embeddings(store: Path, loop_npy: Path, paths: list[Path]) -> float:
    """Largest |difference| between the store's embeddings and the loop's (L2-normalised as the store's are)."""
    from avcache.features.store import FeatureSet

    loop = np.load(loop_npy)  # (N, 512), in sorted path order
    loop = loop / np.linalg.norm(loop, axis=1, keepdims=True)
    with FeatureSet(store / "clip_image") as fs:
        table = fs.table()
        stored = dict(zip(table.column("item_id").to_pylist(), table.column("embedding").to_pylist()))
    if len(stored) != len(paths) or loop.shape != (len(paths), 512):
        raise RuntimeError(f"loop bench: the store holds {len(stored)} items and the loop {loop.shape}, "
                           f"for {len(paths)} images")
    ordered = np.array([stored[f"folder:{p.name}"] for p in sorted(paths)], np.float32)  # (N, 512)
    return float(np.abs(ordered - loop).max())


def run_loop_bench(out: Path, images: int = 400, rounds: int = 2) -> dict:
    from avcache.features.checkpoints import load_profile
    from avcache.features.clip import clip_model
    from avcache.pipeline.adapters import build_manifest

    if rounds < 1:
        raise ValueError(f"loop bench: rounds must be >= 1, got {rounds}")
    root = Path(out) / "loop_bench"
    image_dir, small_dir = root / f"images-{images}", root / "images-2"
    paths = write_images(image_dir, images)
    write_images(small_dir, 2)
    manifest, small_manifest = root / f"manifest-{images}.arrow", root / "manifest-2.arrow"
    build_manifest("folder", image_dir, manifest)
    build_manifest("folder", small_dir, small_manifest)
    _, checkpoint = clip_model(load_profile(PROFILE))  # the seeded ViT-B-32 file, written once, outside timings

    runs: dict[str, list[dict]] = {"loop": [], "avcache": [], "ray": []}
    max_diff = 0.0  # between the store and the loop's array, over every avcache run
    for r in range(rounds):
        runs["loop"].append(_child("loop", str(image_dir), checkpoint, str(root / "loop.npy")))
        for contender, runner in (("avcache", "auto"), ("ray", "ray")):
            shutil.rmtree(root / "store", ignore_errors=True)  # a fresh store: a rerun would skip every item
            runs[contender].append(_child("avcache", str(manifest), str(root / "store"), runner))
            if runs[contender][-1]["written"] != images:
                raise RuntimeError(f"loop bench: avcache ({runner}) wrote {runs[contender][-1]['written']} of "
                                   f"{images} images")
            max_diff = max(max_diff, _same_embeddings(root / "store", root / "loop.npy", paths))
        print(f"[bench] loop round {r + 1}: loop {runs['loop'][-1]['wall_s']:.1f}s, avcache "
              f"({runs['avcache'][-1]['runner']}) {runs['avcache'][-1]['wall_s']:.1f}s, avcache (ray) "
              f"{runs['ray'][-1]['wall_s']:.1f}s ({images} images)", flush=True)
    fixed = {"loop": _child("loop", str(small_dir), checkpoint, str(root / "loop-2.npy"))}
    for contender, runner in (("avcache", "auto"), ("ray", "ray")):
        shutil.rmtree(root / "store-2", ignore_errors=True)
        fixed[contender] = _child("avcache", str(small_manifest), str(root / "store-2"), runner)
    return _summary(images, rounds, runs, fixed, max_diff, diagnose(paths, checkpoint))


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def _summary(images: int, rounds: int, runs: dict, fixed: dict, max_diff: float, diag: dict) -> dict:
    """bench.json keys: `loop_*` the plain loop, `loop_avcache_*` avcache on the runner `make extract` picks on
    one machine (`loop_avcache_runner` names it), `loop_ray_*` avcache on RayRunner."""
    loop = median_of(runs["loop"], "wall_s")
    results = {"loop_images": images, "loop_rounds": rounds, "loop_wall_s": loop,
               "loop_setup_s": median_of(runs["loop"], "setup_s"), "loop_work_s": median_of(runs["loop"], "work_s"),
               "loop_wall_s_2_images": round(fixed["loop"]["wall_s"], 3), "loop_max_abs_diff": max_diff,
               "loop_avcache_runner": runs["avcache"][-1]["runner"], **diag}
    for contender, prefix in (("avcache", "loop_avcache"), ("ray", "loop_ray")):
        wall = median_of(runs[contender], "wall_s")
        results.update({
            f"{prefix}_wall_s": wall, f"{prefix}_over_loop": round(wall / loop, 3),
            f"{prefix}_setup_s": median_of(runs[contender], "setup_s"),
            f"{prefix}_runner_start_s": median_of(runs[contender], "runner_start_s"),
            f"{prefix}_extract_s": median_of(runs[contender], "work_s"),
            f"{prefix}_wall_s_2_images": round(fixed[contender]["wall_s"], 3),
            f"{prefix}_extract_s_2_images": round(fixed[contender]["work_s"], 3)})
    return results


def loop_markdown(results: dict) -> list[str]:
    """bench.md lines for the loop comparison (none when it did not run)."""
    if "loop_wall_s" not in results:
        return []
    r = results
    threads = r["loop_diag_torch_threads"]
    return ["", f"Against the plain loop: `clip_image` on {r['loop_images']} JPEGs (640x480), open_clip ViT-B-32 with "
            f"seeded random weights (profile full-random), each run a fresh process, median of {r['loop_rounds']} "
            f"alternating runs; the store and the loop agree to {r['loop_max_abs_diff']:.1e} (L2-normalised):", "",
            "| run | wall s | of which set-up s | wall s on 2 images | / loop |", "|---|---:|---:|---:|---:|",
            f"| plain loop (DataLoader, 1 worker, batch 32) | {r['loop_wall_s']} | {r['loop_setup_s']} | "
            f"{r['loop_wall_s_2_images']} | 1.0 |",
            f"| avcache `extract`, runner auto ({r['loop_avcache_runner']}) | {r['loop_avcache_wall_s']} | "
            f"{r['loop_avcache_setup_s']} | {r['loop_avcache_wall_s_2_images']} | {r['loop_avcache_over_loop']} |",
            f"| avcache `extract`, runner ray | {r['loop_ray_wall_s']} | {r['loop_ray_setup_s']} | "
            f"{r['loop_ray_wall_s_2_images']} | {r['loop_ray_over_loop']} |", "",
            f"Per image, in one process: decode {r['loop_diag_decode_ms']} ms, preprocess "
            f"{r['loop_diag_preprocess_ms']} ms, ViT-B-32 forward {r['loop_diag_encode_ms_1_thread']} ms on 1 torch "
            f"thread vs {r[f'loop_diag_encode_ms_{threads}_threads']} ms on {threads}, pickling the decoded image "
            f"({r['loop_diag_decoded_kb']} KB) {r['loop_diag_pickle_ms']} ms; once per run: starting Ray "
            f"{r['loop_ray_runner_start_s']} s, sha256 of the 600 MB checkpoint {r['loop_diag_sha256_s']} s (once per "
            f"process: the driver's spec and, on Ray, each actor's)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one contender of the loop bench, in its own process")
    parser.add_argument("mode", choices=["loop", "avcache"])
    parser.add_argument("args", nargs="+", help="loop: IMAGES CHECKPOINT OUT.npy; avcache: MANIFEST STORE RUNNER")
    args = parser.parse_args(argv)
    result = run_loop(Path(args.args[0]), args.args[1], Path(args.args[2])) if args.mode == "loop" \
        else run_avcache(Path(args.args[0]), Path(args.args[1]), args.args[2])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
