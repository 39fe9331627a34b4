"""Masked loss (issue 15): mask discovery (masks/ folders, mask_dir, alpha), the image and its mask through the
same crop/flip, the latent-size mask, kohya's masked loss, the cache, and runs of the loop with masks."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lora_trainer.training.dataset import (
    DatasetError,
    crop_box,
    load_dataset,
    mask_source,
    mask_to_latent,
    training_pixels,
)
from comfyui_lora_trainer.training.loss import apply_loss_mask, per_sample_loss


def save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def noise_image(size, seed, mode="L"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    grey = Image.fromarray(array, "L")
    return grey if mode == "L" else grey.convert(mode)


def captioned(folder, name, image):
    save(os.path.join(folder, name), image)
    with open(os.path.join(folder, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write("a picture")


# -- discovery ------------------------------------------------------------------------------------------
def test_masks_folder_beside_the_images_is_found_and_never_trained_on(tmp_path):
    root = tmp_path / "data"
    captioned(root, "a.png", noise_image((32, 32), 0, "RGB"))
    captioned(root, "b.png", noise_image((32, 32), 1, "RGB"))
    save(root / "masks" / "a.png", noise_image((32, 32), 2))
    save(root / "masks" / "stray.png", noise_image((32, 32), 3))
    captioned(root / "3_dog", "c.jpg", noise_image((32, 32), 4, "RGB"))
    save(root / "3_dog" / "masks" / "c.webp", noise_image((32, 32), 5))
    ds = load_dataset(str(root))
    names = sorted(os.path.basename(i.image_path) for i in ds.items)
    assert names == ["a.png", "b.png", "c.jpg"]  # nothing from masks/ became a training image
    masks = {os.path.basename(i.image_path): i.mask_path for i in ds.items}
    assert masks == {"a.png": str(root / "masks" / "a.png"), "b.png": None,
                     "c.jpg": str(root / "3_dog" / "masks" / "c.webp")}
    assert ds.num_masks == 2
    assert any("stray.png" in w and "no image" in w for w in ds.warnings)


def test_mask_dir_mirrors_the_dataset_and_wins_over_masks_beside(tmp_path):
    root, mask_dir = tmp_path / "data", tmp_path / "my_masks"
    captioned(root, "a.png", noise_image((16, 16), 0, "RGB"))
    captioned(root / "2_cat", "b.png", noise_image((16, 16), 1, "RGB"))
    captioned(root / "2_cat", "c.png", noise_image((16, 16), 2, "RGB"))
    save(root / "masks" / "a.png", noise_image((16, 16), 3))
    save(mask_dir / "a.png", noise_image((16, 16), 4))
    save(mask_dir / "2_cat" / "b.png", noise_image((16, 16), 5))
    save(mask_dir / "c.png", noise_image((16, 16), 6))  # by stem at the top of mask_dir
    ds = load_dataset(str(root), mask_dir=str(mask_dir))
    masks = {os.path.basename(i.image_path): i.mask_path for i in ds.items}
    assert masks == {"a.png": str(mask_dir / "a.png"), "b.png": str(mask_dir / "2_cat" / "b.png"),
                     "c.png": str(mask_dir / "c.png")}
    with pytest.raises(DatasetError, match="mask_dir"):
        load_dataset(str(root), mask_dir=str(tmp_path / "missing"))


def test_dataset_fingerprint_changes_with_a_mask(tmp_path):
    root = tmp_path / "data"
    captioned(root, "a.png", noise_image((16, 16), 0, "RGB"))
    save(root / "masks" / "a.png", noise_image((16, 16), 1))
    before = load_dataset(str(root)).fingerprint()
    save(root / "masks" / "a.png", noise_image((16, 16), 2))
    assert load_dataset(str(root)).fingerprint() != before


def test_mask_sources():
    from comfyui_lora_trainer.training.dataset import DatasetItem

    with_file, without = DatasetItem("a.png", "", mask_path="m.png"), DatasetItem("b.png", "")
    assert mask_source(with_file, False, False) is None
    assert mask_source(with_file, True, False) == "file"
    assert mask_source(with_file, True, True) == "file"  # an explicit mask wins over the alpha
    assert mask_source(without, True, False) == "white"
    assert mask_source(without, False, True) == "alpha"
    assert mask_source(with_file, False, True) == "alpha"  # mask files need masked_loss


# -- image and mask through the same transform -----------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_image_and_mask_file_get_the_same_crop_scale_and_flip(tmp_path, flip, rng_seed):
    from comfyui_lora_trainer.training.dataset import DatasetItem

    grey = noise_image((53, 37), 7)
    save(tmp_path / "img.png", grey.convert("RGB"))
    save(tmp_path / "mask.png", grey)  # the mask is the image itself: any drift shows
    item = DatasetItem(str(tmp_path / "img.png"), "", mask_path=str(tmp_path / "mask.png"))
    out = training_pixels(item, 32, 24, crop="random", rng=np.random.default_rng(rng_seed), flip=flip,
                          masked_loss=True)
    assert out.pixels.shape == (3, 24, 32) and out.mask.shape == (1, 24, 32)
    red = (out.pixels[0] + 1) * 127.5 / 255
    assert torch.allclose(red, out.mask[0], atol=1e-5)
    # the crop offsets are crop_box's (drawn once, used for both)
    (scaled_w, scaled_h), (left, top) = crop_box((53, 37), 32, 24, "random", np.random.default_rng(rng_seed))
    assert out.crop_top_left == (top, left) and out.original_size == (37, 53)
    expected = grey.resize((scaled_w, scaled_h), Image.LANCZOS).crop((left, top, left + 32, top + 24))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255)
    assert torch.allclose(out.mask[0], expected.flip(-1) if flip else expected, atol=1e-6)


def test_alpha_mask_follows_the_image_and_an_opaque_image_trains_whole(tmp_path):
    from comfyui_lora_trainer.training.dataset import DatasetItem

    rgba = Image.new("RGBA", (32, 16), (10, 200, 30, 255))
    alpha = Image.new("L", (32, 16), 0)
    alpha.paste(255, (0, 0, 16, 16))  # left half opaque
    rgba.putalpha(alpha)
    save(tmp_path / "a.png", rgba)
    item = DatasetItem(str(tmp_path / "a.png"), "")
    out = training_pixels(item, 16, 16, alpha_mask=True)  # the centre 16 columns: 8 opaque, 8 transparent
    assert torch.equal(out.mask[0, :, :8], torch.ones(16, 8)) and torch.equal(out.mask[0, :, 8:], torch.zeros(16, 8))
    assert torch.equal(out.flipped().mask, out.mask.flip(-1))
    assert torch.equal(training_pixels(item, 16, 16, alpha_mask=True, flip=True).mask, out.mask.flip(-1))
    # transparent pixels are still white in the image, as without masks
    assert torch.allclose(out.pixels[:, :, 12], torch.ones(3, 16))
    save(tmp_path / "opaque.png", Image.new("RGB", (40, 20), (1, 2, 3)))
    whole = training_pixels(DatasetItem(str(tmp_path / "opaque.png"), ""), 16, 16, alpha_mask=True)
    assert torch.equal(whole.mask, torch.ones(1, 16, 16))
    assert training_pixels(DatasetItem(str(tmp_path / "opaque.png"), ""), 16, 16).mask is None


def test_grey_colour_and_differently_sized_masks(tmp_path):
    from comfyui_lora_trainer.training.dataset import DatasetItem

    save(tmp_path / "a.png", Image.new("RGB", (32, 32), (0, 0, 0)))
    save(tmp_path / "grey.png", Image.new("L", (32, 32), 127))
    out = training_pixels(DatasetItem(str(tmp_path / "a.png"), "", mask_path=str(tmp_path / "grey.png")), 32, 32,
                          masked_loss=True)
    assert torch.allclose(out.mask, torch.full((1, 32, 32), 127 / 255))
    save(tmp_path / "red.png", Image.new("RGB", (16, 16), (255, 0, 0)))  # R channel, as kohya; half size
    out = training_pixels(DatasetItem(str(tmp_path / "a.png"), "", mask_path=str(tmp_path / "red.png")), 32, 32,
                          masked_loss=True)
    assert torch.equal(out.mask, torch.ones(1, 32, 32))


def test_mask_to_latent_is_an_area_average():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1
    mask[:, 0, 8] = 1  # one pixel of the right half
    latent = mask_to_latent(mask, (2, 2))
    assert torch.allclose(latent, torch.tensor([[[1.0, 1 / 64], [1.0, 0.0]]]))
    batched = mask_to_latent(torch.stack([mask, 1 - mask]), (2, 2))
    assert batched.shape == (2, 1, 2, 2) and torch.allclose(batched[1], 1 - latent)
    assert torch.equal(mask_to_latent(latent, (2, 2)), latent)  # already at latent size: unchanged


# -- kohya's masked loss -----------------------------------------------------------------------------------
def test_full_white_mask_gives_the_unmasked_loss_exactly():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    element = (prediction - target) ** 2
    unmasked = per_sample_loss(prediction, target, "mse", 0.1)
    assert torch.equal(apply_loss_mask(element, torch.ones(3, 1, 64, 64)), unmasked)  # pixel-size mask
    assert torch.equal(apply_loss_mask(element, torch.ones(3, 1, 8, 8)), unmasked)
    assert torch.equal(apply_loss_mask(element, None), unmasked)
    half = torch.ones(3, 1, 8, 8)
    half[..., 4:] = 0.5
    assert torch.allclose(apply_loss_mask(element, half), (element * half).mean((1, 2, 3)))  # kohya: mean over all
    with pytest.raises(ValueError, match="mask"):
        apply_loss_mask(element, torch.ones(2, 1, 8, 8))


def test_a_zero_region_does_not_change_the_gradient():
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 1, 64, 64)
    mask[:, :, 16:40, 8:32] = 0  # whole latent pixels (8x8 blocks): rows 2-4, columns 1-3
    zero = mask_to_latent(mask, (8, 8)).expand(2, 4, 8, 8) == 0
    prediction = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)

    def gradient(pred, tgt):
        pred = pred.clone().requires_grad_(True)
        apply_loss_mask((pred - tgt) ** 2, mask).sum().backward()
        return pred.grad

    before = gradient(prediction, target)
    changed_prediction, changed_target = prediction.clone(), target.clone()
    changed_prediction[zero] += 5 * torch.randn(int(zero.sum()), generator=generator)
    changed_target[zero] -= 3
    after = gradient(changed_prediction, changed_target)
    assert torch.equal(before[zero], torch.zeros(int(zero.sum())))
    assert (after - before).abs().max() <= 1e-7
    assert before[~zero].abs().sum() > 0


# -- the latent cache --------------------------------------------------------------------------------------
def test_masks_are_cached_with_the_latents_and_keyed_by_the_mask(tmp_path):
    from comfyui_lora_trainer.training import cache as cache_mod
    from comfyui_lora_trainer.training.models import build_tiny_components

    root = tmp_path / "data"
    captioned(root, "a.png", noise_image((64, 64), 0, "RGB"))
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    save(root / "masks" / "a.png", left)
    ds = load_dataset(str(root))
    base = build_tiny_components("sd1", seed=0)
    cache_mod.clear_memory_cache()

    def build(**masks):
        cache = cache_mod.LatentCache(base, "disk", str(tmp_path / "cache"), True, **masks)
        cache.build(ds.items, [(64, 64)], "cpu")
        return cache

    plain = build()
    assert plain.mask(0, False) is None and plain.vae_calls == 1
    masked = build(masked_loss=True)
    assert masked.vae_calls == 1  # switching masks on encodes again (the key holds the mask)
    mask = masked.mask(0, False)
    latent_hw = tuple(masked.get(0, False)[0].shape[-2:])
    assert mask.shape == (1, *latent_hw)
    assert torch.equal(mask[0, :, : latent_hw[1] // 2], torch.ones(latent_hw[0], latent_hw[1] // 2))
    assert torch.equal(mask[0, :, latent_hw[1] // 2:], torch.zeros(latent_hw[0], latent_hw[1] // 2))
    assert torch.equal(masked.mask(0, True), mask.flip(-1))
    assert torch.equal(masked.get(0, False)[0], plain.get(0, False)[0])  # the latents do not change
    cache_mod.clear_memory_cache()
    assert build(masked_loss=True).vae_calls == 0  # from disk, mask included
    assert torch.equal(build(masked_loss=True).mask(0, False), mask)
    save(root / "masks" / "a.png", Image.new("L", (64, 64), 255))  # an edited mask is a new entry
    edited = build(masked_loss=True)
    assert edited.vae_calls == 1 and torch.equal(edited.mask(0, False), torch.ones_like(mask))
    alpha = build(alpha_mask=True)  # an opaque image with alpha_mask: trains whole, its own key
    assert alpha.vae_calls == 1 and torch.equal(alpha.mask(0, False), torch.ones_like(mask))


# -- Load Dataset's report ---------------------------------------------------------------------------------
def test_report_counts_masks_and_flags_a_mask_of_another_size(tmp_path):
    from comfyui_lora_trainer.nodes.report import analyse_dataset

    root = tmp_path / "data"
    captioned(root, "a.png", noise_image((96, 72), 0, "RGB"))
    captioned(root, "b.png", noise_image((96, 72), 1, "RGB"))
    captioned(root, "c.png", noise_image((96, 72), 2, "RGB"))
    captioned(root, "d.png", Image.new("RGBA", (96, 72), (1, 2, 3, 0)))
    save(root / "masks" / "a.png", noise_image((96, 72), 3))
    save(root / "masks" / "b.png", noise_image((16, 16), 4))  # another size
    (root / "masks" / "c.png").write_bytes(b"not an image")
    report = analyse_dataset(load_dataset(str(root)), resolution=64)
    checks = {os.path.basename(c.path): c for c in report.images}
    assert report.num_masks == 3 and report.num_alpha == 1 and checks["d.png"].has_alpha
    assert checks["a.png"].problems == [] and checks["a.png"].mask == os.path.join("masks", "a.png")
    assert checks["b.png"].problems == ["mask size"] and (checks["b.png"].mask_width, checks["b.png"].mask_height) == (16, 16)
    assert checks["c.png"].problems == ["unreadable mask"]
    text = report.text()
    assert "masks: 3 of 4 images have one" in text and "transparency: 1 of 4 images" in text
    assert "b.png: mask 16x16, image 96x72" in text and "UNREADABLE MASKS" in text


def test_load_dataset_lists_no_masks_folder_as_a_dataset(tmp_path):
    from comfyui_lora_trainer.nodes.dataset import image_folders

    class Host:
        def input_directory(self):
            return str(tmp_path)

    captioned(tmp_path / "cats", "a.png", noise_image((16, 16), 0, "RGB"))
    save(tmp_path / "cats" / "masks" / "a.png", noise_image((16, 16), 1))
    captioned(tmp_path / "dogs" / "2_dog", "b.png", noise_image((16, 16), 2, "RGB"))
    save(tmp_path / "dogs" / "2_dog" / "masks" / "b.png", noise_image((16, 16), 3))
    assert image_folders(Host()) == ["cats", "dogs"]


@pytest.mark.parametrize("crop,flip", [("center", False), ("random", True)])
def test_training_pixels_equal_the_loops_current_pixels(tmp_path, crop, flip):
    """Wiring training_pixels into the loop leaves runs without masks bit-identical."""
    from comfyui_lora_trainer.training.dataset import DatasetItem, image_to_tensor, load_image, resize_and_crop

    save(tmp_path / "a.png", noise_image((70, 45), 9, "RGB"))
    item = DatasetItem(str(tmp_path / "a.png"), "")
    rng = (lambda: np.random.default_rng(3)) if crop == "random" else (lambda: None)
    cropped, top_left = resize_and_crop(load_image(item.image_path), 48, 32, crop, rng())
    old = image_to_tensor(cropped).unsqueeze(0)
    old = old.flip(-1) if flip else old
    new = training_pixels(item, 48, 32, crop=crop, rng=rng(), flip=flip)
    assert torch.equal(new.pixels.unsqueeze(0), old) and new.crop_top_left == top_left and new.mask is None


# -- the loop ----------------------------------------------------------------------------------------------
def masked_copy(tmp_path, value=255, region=None):
    """The sample dataset with a masks/ folder: every mask ``value`` (``region`` (x0, y0, x1, y1) black)."""
    import shutil

    from tiny_runs import SAMPLE

    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    for name in os.listdir(root):
        if name.endswith(".png"):
            with Image.open(root / name) as img:
                mask = Image.new("L", img.size, value)
            if region is not None:
                mask.paste(0, region)
            save(str(root / "masks" / name), mask)
    return str(root)


@pytest.mark.parametrize("center_crop", [True, False], ids=["cached", "uncached"])
def test_a_full_white_mask_trains_exactly_as_no_mask(tmp_path, center_crop):
    from tiny_runs import run

    data = masked_copy(tmp_path)
    plain, _ = run(dataset=data, steps=2, center_crop=center_crop)
    masked, _ = run(dataset=data, steps=2, center_crop=center_crop, masked_loss=True)
    assert plain.lora.tensors.keys() == masked.lora.tensors.keys()
    for key, value in plain.lora.tensors.items():
        assert torch.equal(value, masked.lora.tensors[key]), key
    assert masked.lora.metadata["ss_masked_loss"] == "True" and "ss_masked_loss" not in plain.lora.metadata


def test_a_black_region_changes_what_the_run_learns(tmp_path):
    from tiny_runs import run, tensors_differ

    data = masked_copy(tmp_path, region=(0, 0, 32, 64))  # the left half of each (64 px) image is ignored
    masked, _ = run(dataset=data, steps=2, masked_loss=True)
    plain, _ = run(dataset=data, steps=2)
    assert tensors_differ(masked, plain)


def test_masked_loss_without_any_mask_is_refused(tmp_path):
    from tiny_runs import SAMPLE, run

    with pytest.raises(DatasetError, match="no masks found"):
        run(dataset=SAMPLE, steps=1, masked_loss=True)
