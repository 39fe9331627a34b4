import json
import os

import pytest
from PIL import Image

from comfyui_lora_trainer.training.dataset import (
    DatasetError,
    image_to_tensor,
    load_dataset,
    load_image,
    resize_and_crop,
)


def make_image(path, size=(32, 24), color=(200, 10, 10), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else None).save(path)


def test_sidecar_captions_txt_and_caption(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red box\nsecond line ignored")
    make_image(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("  a jpeg  ")
    make_image(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("webp")
    ds = load_dataset(str(tmp_path))
    assert [os.path.basename(i.image_path) for i in ds.items] == ["a.png", "b.jpg", "c.webp"]
    assert [i.caption for i in ds.items] == ["a red box", "a jpeg", "webp"]
    assert ds.num_samples == 3


def test_metadata_jsonl_and_csv(tmp_path):
    a = tmp_path / "jsonl"
    make_image(a / "x.png")
    make_image(a / "y.bmp")
    (a / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "from jsonl"}) + "\n" + json.dumps({"file_name": "y.bmp", "text": "bmp"})
    )
    assert [i.caption for i in load_dataset(str(a)).items] == ["from jsonl", "bmp"]
    b = tmp_path / "csv"
    make_image(b / "x.png")
    (b / "metadata.csv").write_text("file_name,caption\nx.png,\"from csv, with comma\"\n")
    assert load_dataset(str(b)).items[0].caption == "from csv, with comma"


def test_kohya_repeat_folders_and_class_tokens(tmp_path):
    make_image(tmp_path / "10_sks dog" / "a.png")
    make_image(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.txt").write_text("sks dog running")
    make_image(tmp_path / "2_style" / "c.png")
    (tmp_path / "2_style" / "c.txt").write_text("style")
    ds = load_dataset(str(tmp_path))
    assert ds.num_images == 3
    assert ds.num_samples == 10 + 10 + 2
    assert {i.caption for i in ds.items} == {"sks dog", "sks dog running", "style"}
    assert ds.subsets() == {"10_sks dog": {"n_repeats": 10, "img_count": 2}, "2_style": {"n_repeats": 2, "img_count": 1}}
    assert ds.epoch_indices().count(0) == 10
    assert any("no caption" in w for w in ds.warnings)


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(str(tmp_path))
    make_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="no captions found"):
        load_dataset(str(tmp_path))


def test_fingerprint_follows_content(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("one")
    first = load_dataset(str(tmp_path)).fingerprint()
    assert load_dataset(str(tmp_path)).fingerprint() == first
    (tmp_path / "a.txt").write_text("two")
    second = load_dataset(str(tmp_path)).fingerprint()
    assert second != first
    make_image(tmp_path / "a.png", color=(0, 0, 255))
    assert load_dataset(str(tmp_path)).fingerprint() != second


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    img = load_image(str(tmp_path / "t.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("P", (8, 8)).save(tmp_path / "p.png")
    assert load_image(str(tmp_path / "p.png")).mode == "RGB"
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DatasetError, match="bad.png"):
        load_image(str(tmp_path / "bad.png"))


def test_resize_and_centre_crop():
    img = Image.new("RGB", (200, 100))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter is cropped away
    out, (top, left) = resize_and_crop(img, 64, 64)
    assert out.size == (64, 64) and top == 0 and left == 32
    t = image_to_tensor(out)
    assert t.shape == (3, 64, 64) and t.min() >= -1 and t.max() <= 1
    assert out.getpixel((0, 32))[0] < 50  # the left edge is no longer red
