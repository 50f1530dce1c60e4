"""preprocess_frame equals the transformers Gemma 4 Unified image processor (patches and positions)."""
import numpy as np
import pytest
import torch

from gemma4_agent.model import preprocess_frame
from gemma4_agent.model.preprocess import frame_patches, scale_patches

pytest.importorskip("torchvision")  # the oracle processor is torchvision-based
transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")


def _oracle(rgb, budget):
    processor = transformers.Gemma4UnifiedImageProcessor()
    out = processor(images=[rgb], max_soft_tokens=budget, return_tensors="pt", input_data_format="channels_last")
    n = int(out["num_soft_tokens_per_image"][0])
    return out["pixel_values"][0, :n], out["image_position_ids"][0, :n]


PHOTOS = {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee}


@pytest.mark.parametrize("budget", [70, 280, 1120])
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_photographs(photo, budget):
    rgb = PHOTOS[photo]()
    assert rgb.dtype == np.uint8 and rgb.ndim == 3
    patches, positions = preprocess_frame(rgb, budget)
    ref_patches, ref_positions = _oracle(rgb, budget)
    assert patches.shape == ref_patches.shape and patches.shape[1] == 6912
    assert torch.equal(positions, ref_positions.long())
    assert (patches - ref_patches).abs().max().item() <= 2 / 255


@pytest.mark.parametrize("shape", [(1, 1), (17, 900), (900, 17), (4000, 3000), (48, 48), (480, 640)])
def test_odd_sizes(shape):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    patches, positions = preprocess_frame(rgb, 280)
    ref_patches, ref_positions = _oracle(rgb, 280)
    assert patches.shape == ref_patches.shape
    assert torch.equal(positions, ref_positions.long())
    assert (patches - ref_patches).abs().max().item() <= 2 / 255


def test_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frame(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        preprocess_frame(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="max_soft_tokens"):
        preprocess_frame(np.zeros((10, 10, 3), np.uint8), 100)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_session_path_scales_on_the_device_to_the_same_values(device):
    # the streaming session sends uint8 patches and scales them where the model runs: the values preprocess_frame
    # gives, to the bit, in float32 and after the cast to bf16
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    patches, positions = frame_patches(rgb, 280)
    ref, ref_positions = preprocess_frame(rgb, 280)
    assert patches.dtype == torch.uint8 and torch.equal(positions, ref_positions)
    for dtype in (torch.float32, torch.bfloat16):
        scaled = scale_patches(patches, device, dtype)
        assert scaled.device.type == device and scaled.dtype == dtype
        assert torch.equal(scaled.cpu(), ref.to(dtype))
