"""Datasets: a folder of captioned images -> items, and items -> training tensors.

Layouts read (first match wins per folder):
- ``metadata.jsonl`` with ``file_name`` and ``text`` per line (the diffusers/HF imagefolder layout);
- ``metadata.csv`` with ``file_name`` and a ``caption`` or ``text`` column;
- a same-stem ``.txt`` or ``.caption`` file beside each image (kohya, most taggers).
kohya-style ``N_name`` subfolders repeat their images N times; a missing caption there falls back to
the folder's class tokens (``name``), as kohya does.

Regularization (class) images come from a second folder read the same way (``reg_dataset``). As in kohya
(``DreamBoothDataset``), their repeats are raised or cut so that one epoch holds as many reg samples as
train samples; they are marked ``is_reg`` and their loss is weighted by ``prior_loss_weight``.

Loss masks (kohya's ``masked_loss``): an image's mask is the same-stem image in a ``masks/`` folder beside
it (such folders are never scanned for training images), or in ``mask_dir``; or, with ``alpha_mask``, the
image's own alpha channel. :func:`training_pixels` crops, scales and flips an image and its mask together.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # animated: first frame
CAPTION_EXTENSIONS = (".txt", ".caption")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
MASK_FOLDER = "masks"  # beside the images: same-stem mask images (white trains, black is ignored)


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message names the path and the fix."""


@dataclass
class DatasetItem:
    image_path: str
    caption: str
    repeats: int = 1
    subset: str = "."  # folder relative to the dataset root, for ss_dataset_dirs
    is_reg: bool = False  # a regularization (class) image: its loss is weighted by prior_loss_weight
    caption_lines: list[str] | None = None  # every non-empty line of a multi-line caption file (enable_wildcard)
    mask_path: str | None = None  # its loss mask (masks/<stem>.* beside it, or in mask_dir), if there is one


@dataclass
class Dataset:
    root: str
    items: list[DatasetItem]
    warnings: list[str] = field(default_factory=list)
    reg_root: str | None = None
    num_reg_images: int = 0  # kohya's ss_num_reg_images: reg images x their folder repeats, before balancing
    reg_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_reg_dataset_dirs

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def num_samples(self) -> int:
        """Images counted with their repeats: the length of one epoch (balanced reg samples included)."""
        return sum(item.repeats for item in self.items)

    @property
    def num_train_samples(self) -> int:
        """Train (not reg) images counted with their repeats: kohya's ss_num_train_images."""
        return sum(item.repeats for item in self.items if not item.is_reg)

    @property
    def num_reg_samples(self) -> int:
        """Reg samples per epoch after balancing (about ``num_train_samples`` when a reg folder is given)."""
        return sum(item.repeats for item in self.items if item.is_reg)

    @property
    def num_masks(self) -> int:
        """Images with a mask file."""
        return sum(1 for item in self.items if item.mask_path)

    def has_caption_variants(self) -> bool:
        """True when ``enable_wildcard`` can give an image different captions: a ``{a|b}`` or several lines."""
        return any("{" in item.caption or len(item.caption_lines or ()) > 1 for item in self.items)

    def epoch_indices(self) -> list[int]:
        """Item index per sample of one epoch (repeats expanded), before shuffling."""
        return [i for i, item in enumerate(self.items) for _ in range(item.repeats)]

    def subsets(self) -> dict[str, dict[str, int]]:
        """kohya's ss_dataset_dirs shape: {folder: {"n_repeats": N, "img_count": count}}."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            if item.is_reg:
                continue
            entry = out.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: comma-separated tags, lower-cased, counted per folder (train images)."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            if item.is_reg:
                continue
            counts = out.setdefault(item.subset, {})
            for tag in item.caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return out

    def fingerprint(self) -> str:
        """Changes whenever an image or caption changes (content, not mtime)."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(os.path.relpath(item.image_path, self.root).encode())
            digest.update(file_digest(item.image_path).encode())
            digest.update(item.caption.encode())
            digest.update(str(item.repeats).encode())
            if item.is_reg:
                digest.update(b"reg")
            if item.mask_path:
                digest.update(b"mask" + file_digest(item.mask_path).encode())
        return digest.hexdigest()


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    for encoding in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    # Taggers on Windows sometimes write cp1252; keep the caption rather than failing the run.
    return raw.decode("latin-1")


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _metadata_captions(folder: str) -> dict[str, str] | None:
    jsonl = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(jsonl):
        captions = {}
        for number, line in enumerate(read_text(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[os.path.normpath(row["file_name"])] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"{jsonl}, line {number}: expected a JSON object with 'file_name' and 'text' ({e})"
                ) from None
        return captions
    csv_path = os.path.join(folder, "metadata.csv")
    if os.path.isfile(csv_path):
        rows = list(csv.DictReader(read_text(csv_path).splitlines()))
        if rows and "file_name" in rows[0]:
            column = "caption" if "caption" in rows[0] else "text" if "text" in rows[0] else None
            if column is None:
                raise DatasetError(f"{csv_path}: needs a 'caption' or 'text' column beside 'file_name'")
            return {os.path.normpath(r["file_name"]): (r[column] or "").strip() for r in rows}
        raise DatasetError(f"{csv_path}: needs a 'file_name' column and a 'caption' or 'text' column")
    return None


def _mask_files(folder: str) -> dict[str, str]:
    """stem -> mask image in ``folder`` (the first by IMAGE_EXTENSIONS order when a stem has several)."""
    if not os.path.isdir(folder):
        return {}
    found: dict[str, tuple[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        path = os.path.join(folder, name)
        if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
            rank = IMAGE_EXTENSIONS.index(ext.lower())
            if stem not in found or rank < found[stem][0]:
                found[stem] = (rank, path)
    return {stem: path for stem, (_, path) in found.items()}


def _scan_folder(root: str, folder: str, repeats: int, class_tokens: str, items: list, warnings: list,
                 mask_dir: str | None = None):
    metadata = _metadata_captions(folder)
    subset = os.path.relpath(folder, root)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != MASK_FOLDER)
        if dirpath == root:
            dirnames[:] = []  # top-level subfolders are handled by load_dataset
        image_stems = {os.path.splitext(n)[0] for n in filenames if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS}
        masks = _mask_files(os.path.join(dirpath, MASK_FOLDER))
        for stem in sorted(set(masks) - image_stems):
            warnings.append(f"mask {masks[stem]} has no image of the same name; ignored")
        if mask_dir:  # mask_dir mirrors the dataset's folders; a mask may also lie at its top level
            rel_dir = os.path.relpath(dirpath, root)
            masks = {**masks, **_mask_files(mask_dir)}
            if rel_dir != ".":
                masks.update(_mask_files(os.path.join(mask_dir, rel_dir)))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in CAPTION_EXTENSIONS and stem not in image_stems:
                warnings.append(f"caption {os.path.join(dirpath, name)} has no image of the same name; ignored")
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):  # broken symlink, symlink loop, fifo...
                warnings.append(f"skipped {path}: not a readable file (broken symlink or symlink loop?)")
                continue
            rel = os.path.normpath(os.path.relpath(path, folder))
            caption = None
            lines = None
            if metadata is not None:
                caption = metadata.get(rel)
            if caption is None:
                for caption_ext in CAPTION_EXTENSIONS:
                    sidecar = os.path.join(dirpath, stem + caption_ext)
                    if os.path.isfile(sidecar):
                        text = read_text(sidecar)
                        caption = first_line(text)
                        lines = [line.strip() for line in text.splitlines() if line.strip()]
                        break
            if caption is None:
                caption = class_tokens
                warnings.append(f"no caption for {path}" + (f"; using '{class_tokens}'" if class_tokens else ""))
            items.append(DatasetItem(path, caption, repeats, subset,
                                     caption_lines=lines if lines and len(lines) > 1 else None,
                                     mask_path=masks.get(stem)))


def load_dataset(folder: str, reg_folder: str | None = None, mask_dir: str | None = None) -> Dataset:
    """Scan ``folder`` (see the module docstring for layouts), and ``reg_folder`` for regularization images.
    ``mask_dir``: a folder of the dataset's masks instead of ``masks/`` beside the images.

    Raises DatasetError when unusable.
    """
    if mask_dir and not os.path.isdir(mask_dir):
        raise DatasetError(f"mask_dir folder not found: {mask_dir}. Point it at a folder of masks named like the "
                           "images, or leave it empty to use masks/ folders beside the images.")
    dataset = _load_folder(folder, "dataset", mask_dir)
    if reg_folder:
        dataset = add_regularization(dataset, load_reg_dataset(reg_folder))
    return dataset


def load_reg_dataset(folder: str) -> Dataset:
    """A regularization folder, read like a dataset, before :func:`add_regularization` balances it."""
    return _load_folder(folder, "reg_dataset")


def add_regularization(dataset: Dataset, reg: Dataset) -> Dataset:
    """kohya's reg balancing (``DreamBoothDataset.__init__``): reg images, in order, are registered with
    their folder repeats until they cover the train samples; if they fall short, their repeats grow by one,
    image after image, until they do. Reg images beyond the train samples are left out, with a warning."""
    train_samples = dataset.num_train_samples
    num_reg = reg.num_samples
    warnings = list(dataset.warnings) + [f"reg_dataset: {w}" for w in reg.warnings]
    if num_reg > train_samples:
        warnings.append(f"reg_dataset has {num_reg} samples with repeats, more than the {train_samples} train samples; "
                        "some reg images are not used (as in kohya)")
    chosen: list[DatasetItem] = []
    n = 0
    for item in reg.items:
        chosen.append(dataclasses.replace(item, is_reg=True))
        n += item.repeats
        if n >= train_samples:
            break
    while n < train_samples:
        for i in range(len(chosen)):
            chosen[i].repeats += 1
            n += 1
            if n >= train_samples:
                break
    reg_dirs = {}
    for item in reg.items:
        entry = reg_dirs.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return Dataset(dataset.root, list(dataset.items) + chosen, warnings, reg_root=reg.root, num_reg_images=num_reg,
                   reg_dirs=reg_dirs)


def _load_folder(folder: str, key: str, mask_dir: str | None = None) -> Dataset:
    root = os.path.abspath(folder)
    if not os.path.isdir(root):
        raise DatasetError(f"{key} folder not found: {folder}. Point it at a folder of images with captions.")
    mask_dir = os.path.abspath(mask_dir) if mask_dir else None
    items: list[DatasetItem] = []
    warnings: list[str] = []
    _scan_folder(root, root, 1, "", items, warnings, mask_dir)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name.startswith(".") or name == MASK_FOLDER:
            continue
        if mask_dir and os.path.realpath(path) == os.path.realpath(mask_dir):
            continue
        real = os.path.realpath(path)
        if os.path.islink(path) and (real == os.path.realpath(root) or os.path.realpath(root).startswith(real + os.sep)):
            warnings.append(f"skipped {path}: a symlink back to the dataset folder or above it (a loop)")
            continue
        match = REPEAT_FOLDER.match(name)
        if match:
            _scan_folder(root, path, max(1, int(match.group(1))), match.group(2).strip(), items, warnings, mask_dir)
        else:
            _scan_folder(root, path, 1, "", items, warnings, mask_dir)
    where = "" if key == "dataset" else f"{key}: "
    if not items:
        raise DatasetError(
            f"{where}no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, also in N_name subfolders)"
        )
    if all(not item.caption for item in items):
        raise DatasetError(
            f"{where}no captions found in {folder}: add a .txt file with the same name beside each image, "
            "or a metadata.jsonl / metadata.csv"
            + (", or put the images in an N_class folder (e.g. 1_dog) so the class name is the caption"
               if key == "reg_dataset" else "")
        )
    return Dataset(root, items, warnings)


def _open_upright(path: str, what: str = "image"):
    """The first frame of an image file, EXIF orientation applied, decoded (PIL)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.seek(0)
            upright = ImageOps.exif_transpose(img)
            upright = img.copy() if upright is img else upright  # outlive the file
            upright.load()
            return upright
    except Image.DecompressionBombError as e:
        raise DatasetError(
            f"{what} {path} is too large to decode safely ({e}). Downscale it (4096 pixels on the long side "
            "is plenty for training) or remove it."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"cannot read {what} {path}: {e}. Remove or re-save the file.") from None


def has_alpha(img) -> bool:
    """Whether a PIL image has transparency (an alpha channel, or a palette with a transparent entry)."""
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _to_rgb(img):
    from PIL import Image

    if has_alpha(img):
        # Transparent pixels become white, as image viewers show them, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def load_image(path: str):
    """Open an image upright (EXIF orientation applied), first frame, as RGB."""
    return _to_rgb(_open_upright(path))


def _alpha_of(img):
    """The alpha channel of an opened image as an "L" image, or None when it has none."""
    return img.convert("RGBA").getchannel("A") if has_alpha(img) else None


def load_mask(path: str, size: tuple[int, int] | None = None):
    """A mask file as an "L" image: white (255) trains, black is ignored, grey weights. Colour masks use their
    R channel, as kohya does; transparent parts of a mask count as black. ``size`` (width, height): stretch
    to it (a mask of another size than its image; Load Dataset's report flags those)."""
    from PIL import Image

    img = _open_upright(path, "mask")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    mask = img.convert("L") if img.mode in ("1", "L") else img.convert("RGB").getchannel("R")
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.BILINEAR)
    return mask


def mask_source(item: DatasetItem, masked_loss: bool, alpha_mask: bool) -> str | None:
    """Where an item's loss mask comes from: ``"file"`` (its mask file, with ``masked_loss``), ``"alpha"``
    (its alpha channel, with ``alpha_mask``), ``"white"`` (masks are on but it has none: it trains whole), or
    None (masks are off)."""
    if masked_loss and item.mask_path:
        return "file"
    if alpha_mask:
        return "alpha"
    return "white" if masked_loss else None


def crop_box(image_size: tuple[int, int], width: int, height: int, crop: str = "center", rng=None):
    """How an image of ``image_size`` (w, h) is fitted to width x height: scaled to cover it, then cropped.
    Returns ((scaled_w, scaled_h), (left, top)); ``crop = "random"`` draws the offset from ``rng``."""
    scale = max(width / image_size[0], height / image_size[1])
    new_w, new_h = max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale))
    if crop == "random" and rng is not None:
        left = int(rng.integers(0, new_w - width + 1))
        top = int(rng.integers(0, new_h - height + 1))
    else:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    return (new_w, new_h), (left, top)


def _apply_box(img, box, width: int, height: int):
    from PIL import Image

    (new_w, new_h), (left, top) = box
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.LANCZOS)
    return img.crop((left, top, left + width, top + height))


def resize_and_crop(img, width: int, height: int, crop: str = "center", rng=None):
    """Scale ``img`` to cover width x height, then crop. Returns (image, (crop_top, crop_left))."""
    box = crop_box(img.size, width, height, crop, rng)
    return _apply_box(img, box, width, height), (box[1][1], box[1][0])


@dataclass
class TrainingPixels:
    """An image as trained and its loss mask, transformed together: see :func:`training_pixels`."""

    pixels: object  # torch [3, H, W] in [-1, 1]
    mask: object | None  # torch [1, H, W] in [0, 1], or None when masks are off
    original_size: tuple[int, int]  # (height, width) before scaling, as SDXL's time ids want it
    crop_top_left: tuple[int, int]  # (top, left) in the scaled image

    def flipped(self) -> "TrainingPixels":
        """The mirror image, its mask mirrored with it."""
        return dataclasses.replace(self, pixels=self.pixels.flip(-1),
                                   mask=None if self.mask is None else self.mask.flip(-1))


def training_pixels(item: DatasetItem, width: int, height: int, *, crop: str = "center", rng=None,
                    flip: bool = False, masked_loss: bool = False, alpha_mask: bool = False) -> TrainingPixels:
    """An item's image at width x height and its loss mask (:func:`mask_source`), both through one crop box
    and one flip, so they cannot drift apart. The mask is None when masks are off, and all ones for an item
    without one (also for ``alpha_mask`` on an image without alpha, as in kohya)."""
    import torch

    opened = _open_upright(item.image_path)
    image = _to_rgb(opened)
    source = mask_source(item, masked_loss, alpha_mask)
    mask_image = None
    if source == "file":
        mask_image = load_mask(item.mask_path, image.size)
    elif source == "alpha":
        mask_image = _alpha_of(opened)
    box = crop_box(image.size, width, height, crop, rng)
    pixels = image_to_tensor(_apply_box(image, box, width, height))
    mask = None
    if source is not None:
        mask = torch.ones(1, height, width) if mask_image is None \
            else mask_to_tensor(_apply_box(mask_image, box, width, height))
    out = TrainingPixels(pixels, mask, (image.height, image.width), (box[1][1], box[1][0]))
    return out.flipped() if flip else out


def mask_to_tensor(mask):
    """PIL "L" mask -> float tensor [1, H, W] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0).contiguous()


def mask_to_latent(mask, latent_size: tuple[int, int]):
    """A pixel mask [1, H, W] or [B, 1, H, W] reduced to latent size (h, w) by area averaging, as kohya's
    ``apply_masked_loss`` does: a latent pixel's weight is the mean of the mask over the pixels it covers."""
    import torch.nn.functional as F

    batched = mask.dim() == 4
    m = mask if batched else mask.unsqueeze(0)
    if tuple(m.shape[-2:]) != tuple(latent_size):
        m = F.interpolate(m.float(), size=tuple(latent_size), mode="area")
    return m if batched else m[0]


def image_to_tensor(img):
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as trained: EXIF orientation applied, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e}. Remove or re-save the file.") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def with_trigger(caption: str, trigger: str) -> str:
    """``trigger, caption`` unless the caption already names the trigger."""
    if not trigger or trigger.lower() in caption.lower():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, choose) -> str:
    """kohya's ``enable_wildcard``: each ``{a|b|c}`` becomes one of its options (``choose(n)`` -> index);
    ``{{`` and ``}}`` stand for literal braces."""
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def pick(match):
        options = match.group(1).split("|")
        return options[choose(len(options))]

    caption = _WILDCARD.sub(pick, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_token_count(n_flexible: int, step: int, warmup_min: int, warmup_steps: int) -> int:
    """kohya's caption token warmup: how many flexible tags a caption keeps at optimizer step ``step``
    (0-based): ``floor(step * (n - min) / warmup_steps) + min`` until ``warmup_steps``, then all."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return n_flexible
    return math.floor(step * (n_flexible - warmup_min) / warmup_steps) + warmup_min


def process_caption(caption: str, *, trigger: str = "", shuffle: bool = False, keep_tokens: int = 0,
                    separator: str = ",", dropout_rate: float = 0.0, tag_dropout_rate: float = 0.0,
                    drop_all: bool = False, generator=None, wildcard: bool = False,
                    lines: list[str] | None = None, step: int = 0, token_warmup_min: int = 1,
                    token_warmup_step: int = 0) -> str:
    """kohya's caption options for one sample; randomness comes from ``generator`` (torch.Generator).

    The first ``keep_tokens`` tags stay in place and are never dropped; the rest are dropped with
    ``tag_dropout_rate`` each and shuffled with ``shuffle``. ``dropout_rate`` (or ``drop_all``: every
    N-th epoch) replaces the whole caption, trigger included, with "" (unconditional training). The
    trigger word, if any, is placed first and counts as kept. With ``wildcard`` one of the caption file's
    ``lines`` is picked and each ``{a|b}`` resolved to one option. ``token_warmup_step`` (in optimizer
    steps) limits the flexible tags to ``warmup_token_count`` at ``step``, as kohya does, before the shuffle.
    """
    import torch

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    def choose(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=generator))

    if drop_all or (dropout_rate > 0 and uniform() < dropout_rate):
        return ""
    if wildcard:
        if lines and len(lines) > 1:
            caption = lines[choose(len(lines))]
        if "{" in caption:
            caption = expand_wildcards(caption, choose)
    warmup = token_warmup_step > 0 and step < token_warmup_step
    if not (shuffle or tag_dropout_rate > 0 or warmup):
        return with_trigger(caption, trigger)
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if warmup:
        flexible = flexible[:max(0, warmup_token_count(len(flexible), step, token_warmup_min, token_warmup_step))]
    if tag_dropout_rate > 0:
        flexible = [t for t in flexible if uniform() >= tag_dropout_rate]
    if shuffle and len(flexible) > 1:
        flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
    joiner = separator.strip() + " " if separator.strip() else separator
    return with_trigger(joiner.join(fixed + flexible), trigger)
