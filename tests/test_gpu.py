"""GPU paths (bf16 autocast, actors with num_gpus): run where CUDA is present, skipped elsewhere."""
import numpy as np
import pytest
import torch

from avcache.features.beats import BeatsEncoder
from avcache.features.clip import create_clip
from avcache.features.tiny import ensure_tiny_beats
from avcache.pipeline.stages import ClipImageStage, Resources

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def test_clip_stage_on_gpu_matches_cpu_within_bf16_tolerance():
    frames = np.random.default_rng(0).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
    cpu, _, _ = create_clip("avcache-tiny-clip", "tiny", device="cpu")
    stage = ClipImageStage("avcache-tiny-clip", str(cpu.spec["checkpoint"]), Resources(num_gpus=1))
    stage.setup()
    assert stage.device() == "cuda"
    gpu_rows = stage.encode([{"image": f} for f in frames])
    gpu = np.stack([row["embedding"] for row in gpu_rows])
    assert np.abs(gpu - cpu.encode_images(list(frames))).max() < 3e-2


def test_beats_on_gpu_matches_cpu_within_bf16_tolerance():
    waves = [np.random.default_rng(i).standard_normal(16000 + 4000 * i).astype(np.float32) * 0.1 for i in range(3)]
    checkpoint = ensure_tiny_beats()
    on_cpu = BeatsEncoder(checkpoint, "cpu").encode(waves)
    on_gpu = BeatsEncoder(checkpoint, "cuda").encode(waves)
    for a, b in zip(on_cpu, on_gpu):
        assert a["tokens"].shape == b["tokens"].shape
        assert np.abs(a["tag_probs"] - b["tag_probs"]).max() < 3e-2



def _faiss_has_gpu() -> bool:
    from avcache.features.index import gpu_available

    return gpu_available()


@pytest.mark.skipif(not _faiss_has_gpu(), reason="faiss was built without GPU support (faiss-cpu)")
def test_ivf_trained_on_gpu_is_saved_as_a_cpu_index_that_reaches_the_target():
    import faiss

    from avcache.eval.index_bench import clustered_vectors
    from avcache.features.index import VectorRows, make_index

    vectors = clustered_vectors(20_000, dim=64, clusters=500, latent=16, seed=3)
    index, info = make_index(VectorRows([vectors], 64), "IVF128,PQ8x4fs,Refine(SQ8)", use_gpu=True, log=print)
    assert info["device"] == "gpu" and info["recall"]["target_met"]
    faiss.write_index(index, faiss.VectorIOWriter())  # a GPU index would refuse to serialise


def test_the_brewclip_recipe_trains_on_the_gpu_to_the_scores_of_the_cpu(tmp_path):
    from avcache.eval.train_bench import write_planted_store
    from avcache.train.recipes import brewclip

    store = write_planted_store(tmp_path / "planted", images=40, clip_dim=32, whisper_dim=48, signal=0.3)
    quiet = dict(log=lambda *a: None)
    on_cpu = brewclip.main(store, tmp_path / "cpu", overrides=["train.epochs=3", "train.device=cpu"], **quiet)
    on_gpu = brewclip.main(store, tmp_path / "gpu", overrides=["train.epochs=3", "train.device=cuda"], **quiet)
    assert abs(on_gpu["s2i_R@1"] - on_cpu["s2i_R@1"]) <= 0.1  # float32 either way; summation order differs


def test_a_gpu_run_resumes_on_the_gpu(tmp_path):
    from avcache.eval.train_bench import write_planted_store
    from avcache.train.recipes import brewclip

    store = write_planted_store(tmp_path / "planted", images=24, clip_dim=32, whisper_dim=48, signal=0.3)
    brewclip.main(store, tmp_path / "run", overrides=["train.epochs=1", "train.device=cuda"], log=lambda *a: None)
    results = brewclip.main(store, tmp_path / "run", overrides=["train.epochs=2", "train.device=cuda"],
                            log=lambda *a: None)
    assert results["epochs"] == 2
