"""Issue 7, bad input: the corpus in tests/reliability/corpus.py against the dataset loader, the image
loader, the config and the Train LoRA node. Broken input fails with an error naming the file and what
to do, and nothing is written; awkward but valid input (CMYK, 16-bit, palette, RGBA, EXIF-rotated,
animated, 1x1) trains."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from comfyui_lora_trainer.nodes.dataset import LoadDataset
from comfyui_lora_trainer.nodes.spec import NodeError
from comfyui_lora_trainer.nodes.train import TrainLoRA
from comfyui_lora_trainer.training.config import ConfigError, TrainConfig
from comfyui_lora_trainer.training.dataset import (
    DatasetError,
    image_to_tensor,
    load_dataset,
    load_image,
    resize_and_crop,
)
from comfyui_lora_trainer.training.loop import train
from comfyui_lora_trainer.training.models import tiny_tokenizer_dir

from reliability import corpus

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "training", "sample_dataset")


def tiny_config(checkpoint, dataset, out, **over):
    values = dict(checkpoint=checkpoint, tokenizer=tiny_tokenizer_dir(), dataset=str(dataset), output_dir=str(out),
                  output_name="rel", steps=2, rank=2, alpha=2.0, learning_rate=1e-3, resolution=64, batch_size=1,
                  seed=0, device="cpu")
    values.update(over)
    return TrainConfig(**values)


def good_dataset(folder, n=2):
    for i in range(n):
        corpus.write_png(folder / f"good{i}.png", color=(10 * i, 100, 200))
        (folder / f"good{i}.txt").write_text(f"good image {i}")
    return folder


# -- folders --------------------------------------------------------------------------------------


def test_empty_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found in .*empty"):
        load_dataset(str(tmp_path / "empty"))


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        load_dataset(str(tmp_path / "nowhere"))


def test_no_captions_at_all_is_refused_with_the_fix(tmp_path):
    corpus.write_png(tmp_path / "a.png")
    corpus.write_png(tmp_path / "b.png")
    with pytest.raises(DatasetError, match=r"no captions found .*\.txt file with the same name"):
        load_dataset(str(tmp_path))


# -- broken images: a clear error naming the file, nothing written -------------------------------

BROKEN = {
    "zero_byte.png": corpus.write_zero_byte,
    "truncated.png": lambda p: corpus.write_truncated(p, "PNG"),
    "truncated.jpg": lambda p: corpus.write_truncated(p, "JPEG"),
    "text_renamed.png": corpus.write_text_as_image,
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_error_names_file_and_fix(tmp_path, name):
    path = BROKEN[name](tmp_path / name)
    with pytest.raises(DatasetError) as info:
        load_image(path)
    message = str(info.value)
    assert path in message and "Remove or re-save" in message


@pytest.mark.parametrize("name", ["zero_byte.png", "truncated.jpg"])
def test_training_on_a_broken_image_fails_cleanly_and_writes_nothing(tmp_path, tiny_checkpoint, name):
    data = good_dataset(tmp_path / "data")
    bad = BROKEN[name](data / name)
    (data / (os.path.splitext(name)[0] + ".txt")).write_text("broken")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=os.path.basename(bad)):
        train(tiny_config(tiny_checkpoint, data, out))
    assert os.listdir(out) == []


def test_node_reports_a_broken_image_as_a_node_error_and_writes_nothing(host):
    data = good_dataset(Path(host.input_directory()) / "ds")
    corpus.write_truncated(data / "cut.png", "PNG")
    (data / "cut.txt").write_text("cut")
    dataset = LoadDataset.execute(host, folder="ds").values[0]
    with pytest.raises(NodeError, match="cut.png"):
        TrainLoRA.execute(host, checkpoint="tiny.safetensors", dataset=dataset, steps=2, learning_rate=1e-3, rank=2,
                          alpha=2.0, resolution=64, batch_size=1, seed=0, output_name="x", precision="fp32")
    assert os.listdir(host.loras_directory()) == []


# -- awkward but valid images: they must work ----------------------------------------------------


def test_cmyk_jpeg_loads_as_rgb_with_the_right_colour(tmp_path):
    img = load_image(corpus.write_cmyk_jpeg(tmp_path / "cmyk.jpg"))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60, (r, g, b)  # CMYK (0, 255, 255, 0) is red


def test_16bit_png_keeps_its_tones(tmp_path):
    img = load_image(corpus.write_png16(tmp_path / "g16.png"))
    assert img.mode == "RGB" and img.size == (64, 32)
    row = [img.getpixel((x, 5))[0] for x in range(64)]
    assert row[0] < 5 and row[-1] > 250 and row == sorted(row)  # the ramp survives, not clipped to white


def test_palette_and_rgba(tmp_path):
    pal = load_image(corpus.write_palette(tmp_path / "p.png"))
    assert pal.getpixel((2, 2)) == (255, 0, 0) and pal.getpixel((30, 2)) == (0, 0, 255)
    rgba = load_image(corpus.write_rgba(tmp_path / "rgba.png"))
    assert rgba.mode == "RGB"
    assert rgba.getpixel((2, 2)) == (0, 200, 0)
    assert rgba.getpixel((30, 2)) == (255, 255, 255)  # transparent -> white, not black


def test_exif_rotated_photo_is_upright(tmp_path):
    img = load_image(corpus.write_exif_rotated(tmp_path / "rot.jpg"))
    assert img.size == (32, 48)  # stored 48x32, shown portrait
    right, left = img.getpixel((28, 24)), img.getpixel((2, 24))
    assert right[0] > 200 and right[2] < 60, right  # the red band is on the right once upright
    assert left[2] > 200 and left[0] < 60, left


@pytest.mark.parametrize("fmt,ext", [("GIF", ".gif"), ("WEBP", ".webp")])
def test_animated_image_gives_its_first_frame(tmp_path, fmt, ext):
    path = corpus.write_animated(tmp_path / f"anim{ext}", fmt)
    img = load_image(path)
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and b < 60, (r, g, b)  # frame 0 is red, frame 1 blue
    (tmp_path / f"anim.txt").write_text("animated")
    assert [os.path.basename(i.image_path) for i in load_dataset(str(tmp_path)).items] == [f"anim{ext}"]


def test_one_pixel_image_is_scaled_up(tmp_path):
    img = load_image(corpus.write_png(tmp_path / "dot.png", size=(1, 1), color=(0, 255, 0)))
    cropped, (top, left) = resize_and_crop(img, 64, 64)
    tensor = image_to_tensor(cropped)
    assert tensor.shape == (3, 64, 64) and torch.isfinite(tensor).all()
    assert (top, left) == (0, 0)


def test_awkward_but_valid_images_train_end_to_end(tmp_path, tiny_checkpoint):
    data = tmp_path / "awkward"
    data.mkdir()
    writers = {
        "cmyk.jpg": corpus.write_cmyk_jpeg, "g16.png": corpus.write_png16, "pal.png": corpus.write_palette,
        "rgba.png": corpus.write_rgba, "rot.jpg": corpus.write_exif_rotated,
        "anim.gif": lambda p: corpus.write_animated(p, "GIF"), "anim2.webp": lambda p: corpus.write_animated(p, "WEBP"),
        "dot.png": lambda p: corpus.write_png(p, size=(1, 1)),
    }
    for name, write in writers.items():
        write(data / name)
        (data / (os.path.splitext(name)[0] + ".txt")).write_text(name)
    out = tmp_path / "out"
    result = train(tiny_config(tiny_checkpoint, data, out, steps=3, batch_size=2))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert os.listdir(out) == ["rel.safetensors"]


# -- a 20000 x 20000 image: refused without running out of memory --------------------------------


def test_huge_image_is_refused_without_decoding_it(tmp_path):
    path = corpus.write_huge_png(tmp_path / "huge.png", 20000, 20000)
    assert os.path.getsize(path) < 2_000_000  # the file is small; decoded it would be 400 M pixels (1.2 GB RGB)
    script = textwrap.dedent(f"""
        import resource, sys
        from comfyui_lora_trainer.training.dataset import DatasetError, load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_image({path!r})
        except DatasetError as e:
            print("REFUSED", e)
        else:
            print("LOADED")
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
        print("GREW_KIB", grew)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and path in out.stdout and "Downscale" in out.stdout, out.stdout
    grew_kib = int(out.stdout.split("GREW_KIB")[1])
    assert grew_kib < 100 * 1024, f"peak memory grew by {grew_kib / 1024:.0f} MiB"


# -- captions -------------------------------------------------------------------------------------


def test_non_utf8_captions_are_read_not_fatal(tmp_path):
    corpus.write_png(tmp_path / "a.png")
    corpus.write_caption(tmp_path / "a.txt", "café crème, naïve", "cp1252")
    corpus.write_png(tmp_path / "b.png")
    corpus.write_caption(tmp_path / "b.txt", "über straße", "utf-16")  # Python writes the BOM
    corpus.write_png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\x00garbage \x81\x8d bytes")  # not valid in any UTF
    ds = load_dataset(str(tmp_path))
    captions = {os.path.basename(i.image_path): i.caption for i in ds.items}
    assert captions["a.png"] == "café crème, naïve"
    assert captions["b.png"] == "über straße"
    assert isinstance(captions["c.png"], str)


def test_caption_without_image_is_reported_and_ignored(tmp_path):
    good_dataset(tmp_path)
    (tmp_path / "orphan.txt").write_text("an image that is not there")
    ds = load_dataset(str(tmp_path))
    assert ds.num_images == 2
    assert any("orphan.txt" in w and "no image" in w for w in ds.warnings), ds.warnings


# -- symlinks -------------------------------------------------------------------------------------


def test_symlink_loops_terminate_without_duplicates(tmp_path):
    data = good_dataset(tmp_path / "data")
    sub = data / "5_thing"
    sub.mkdir()
    corpus.write_png(sub / "s.png")
    (sub / "s.txt").write_text("sub image")
    os.symlink(".", data / "loop_self")  # data/loop_self -> data
    os.symlink("..", data / "loop_up")  # data/loop_up -> tmp_path (contains data)
    os.symlink("..", sub / "back")  # inside a subfolder: os.walk must not follow it
    os.symlink("x.png", data / "y.png")  # file loop x.png -> y.png -> x.png
    os.symlink("y.png", data / "x.png")
    os.symlink("missing.png", data / "dangling.png")
    ds = load_dataset(str(data))
    names = sorted(os.path.relpath(i.image_path, data) for i in ds.items)
    assert names == ["5_thing/s.png", "good0.png", "good1.png"]
    joined = "\n".join(ds.warnings)
    assert "loop_self" in joined and "loop_up" in joined and "x.png" in joined and "dangling.png" in joined
    assert len(ds.fingerprint()) == 64  # hashing never touches the looping files


# -- numeric inputs out of range ------------------------------------------------------------------

OUT_OF_RANGE = [
    ("rank", 0), ("rank", -4), ("steps", 0), ("steps", -1), ("learning_rate", 0.0), ("learning_rate", -1e-4),
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("alpha", 0.0), ("alpha", float("nan")),
    ("resolution", 0), ("resolution", 65), ("batch_size", 0), ("gradient_accumulation_steps", 0),
]


@pytest.mark.parametrize("key,value", OUT_OF_RANGE)
def test_out_of_range_numbers_name_the_key_and_write_nothing(tmp_path, key, value):
    out = tmp_path / "out"
    config = tiny_config("unused.safetensors", tmp_path, out, **{key: value})
    with pytest.raises(ConfigError, match=rf"^{key} = "):
        train(config)
    assert not out.exists()


def node_inputs(dataset, **over):
    values = dict(checkpoint="tiny.safetensors", dataset=dataset, steps=2, learning_rate=1e-3, rank=2, alpha=2.0,
                  resolution=64, batch_size=1, seed=0, output_name="n", precision="fp32")
    values.update(over)
    return values


@pytest.mark.parametrize("key,value", [("rank", 0), ("steps", 0), ("learning_rate", 0.0)])
def test_node_refuses_out_of_range_numbers(host, key, value):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    with pytest.raises(NodeError, match=key):
        TrainLoRA.execute(host, **node_inputs(dataset, **{key: value}))
    assert os.listdir(host.loras_directory()) == []
    assert host.freed == 0  # refused before ComfyUI's models were unloaded


def test_node_refuses_batch_larger_than_the_dataset(host):
    dataset = LoadDataset.execute(host, folder="shapes").values[0]
    assert dataset.num_samples == 8
    with pytest.raises(NodeError, match=r"batch_size 9 .*8 samples"):
        TrainLoRA.execute(host, **node_inputs(dataset, batch_size=9))
    assert os.listdir(host.loras_directory()) == []


def test_train_refuses_batch_larger_than_the_dataset(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    with pytest.raises((ConfigError, DatasetError), match="batch_size"):
        train(tiny_config(tiny_checkpoint, SAMPLE, out, batch_size=9))
    assert not out.exists() or os.listdir(out) == []
