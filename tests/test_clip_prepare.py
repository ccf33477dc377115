"""CLIP's preprocessing in the decoders (issue 17): the image and video decoders resize and normalise for the CLIP
that follows them, so that work overlaps the encoder instead of preceding it. The pixels are exactly the model's
own preprocessing, the embeddings do not change, and a model that preprocesses otherwise is refused at setup."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from avcache.features.checkpoints import load_profile
from avcache.features.clip import check_preprocess, clip_model, clip_preprocess_cfg, clip_transform, create_clip
from avcache.pipeline.config import load_config
from avcache.pipeline.extractors import Context, get_extractor
from avcache.pipeline.stages import ClipImageStage, DecodeImage, DecodeVideo, Resources


def _photo(height=120, width=160, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("model", ["ViT-B-32", "RN50"])
def test_the_decoders_transform_is_open_clips_own(model):
    network, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
    cfg = clip_preprocess_cfg(model, None)
    image = Image.fromarray(_photo(480, 640))
    assert torch.equal(clip_transform(cfg)(image), preprocess(image))
    check_preprocess(network, cfg)  # agrees: no error


def test_a_registry_tag_brings_its_own_preprocessing_and_a_mismatch_is_refused():
    siglip = clip_preprocess_cfg("ViT-B-16-SigLIP", "webli")  # read from open_clip's registry, no download
    assert (siglip["mean"], siglip["resize_mode"]) == ([0.5, 0.5, 0.5], "squash")
    network, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    with pytest.raises(ValueError, match="the decoder prepared CLIP pixels with .* but the loaded model"):
        check_preprocess(network, {**clip_preprocess_cfg("ViT-B-32", None), "mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Z-99'"):
        clip_preprocess_cfg("ViT-Z-99", None)


def test_prepared_pixels_give_the_embeddings_of_the_raw_image(tmp_path):
    model, checkpoint = clip_model(load_profile("tiny"))
    encoder, _, _ = create_clip(model, checkpoint)
    cfg = clip_preprocess_cfg(model, checkpoint)
    path = tmp_path / "photo.png"
    Image.fromarray(_photo()).save(path)
    rows = {"item_id": ["p"], "error": [""], "image_path": [str(path)]}
    raw = DecodeImage().process(rows)["image"][0]
    decoder = DecodeImage(preprocess=cfg)
    decoder.setup()
    prepared = decoder.process(rows)["image"][0]
    assert raw.dtype == np.uint8 and prepared.dtype == np.float32 and prepared.shape == (3, *cfg["size"])
    np.testing.assert_array_equal(encoder.encode_images([prepared]), encoder.encode_images([raw]))
    np.testing.assert_array_equal(encoder.encode_image_tokens([prepared]), encoder.encode_image_tokens([raw]))


def test_video_frames_are_prepared_frame_by_frame(tmp_path):
    from avcache.pipeline.synth import write_synthetic

    write_synthetic(tmp_path / "data", items=4, seed=0, speech="off")
    video = sorted((tmp_path / "data").rglob("*.mp4"))[0]
    model, checkpoint = clip_model(load_profile("tiny"))
    cfg = clip_preprocess_cfg(model, checkpoint)
    rows = {"item_id": ["v"], "error": [""], "video_path": [str(video)]}
    raw = DecodeVideo(num_frames=4).process(rows)["frames"][0]  # (T, H, W, 3) uint8
    prepared = DecodeVideo(num_frames=4, preprocess=cfg).process(rows)["frames"][0]  # (T, 3, S, S) float32
    transform = clip_transform(cfg)
    expected = np.stack([transform(Image.fromarray(frame)).numpy() for frame in raw])
    np.testing.assert_array_equal(prepared, expected)


def test_the_registered_clip_sets_prepare_in_the_decoder_and_check_at_setup(tmp_path):
    from avcache.features.store import FeatureStore

    config = load_config()
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=None, store=FeatureStore(tmp_path))
    expected = clip_preprocess_cfg(*clip_model(ctx.profile))
    for name in ("clip_image", "clip_image_tokens", "clip_frames"):
        decoder, encoder = get_extractor(name).build_stages(ctx)
        assert decoder.clip.preprocess == expected and encoder.preprocess == expected, name
    model, checkpoint = clip_model(ctx.profile)
    stage = ClipImageStage(model, checkpoint, Resources(), preprocess={**expected, "size": [64, 64]})
    with pytest.raises(ValueError, match="preprocesses with"):
        stage.setup()
