"""The dataset report of Load Dataset: what would make a run fail or train badly, found before it starts.

Checks every image (opened and decoded once): unreadable files, very small images, duplicates (same
pixels, whatever the file format or name), missing and empty captions, captions longer than the text
encoder's 77 tokens (the rest is cut off), and the aspect-ratio buckets the images fall into. Loss masks
(issue 15): counts the images with a mask file and those with transparency (``alpha_mask``), and flags
a mask that cannot be read or whose size differs from its image's. Also draws
a preview grid with problem images framed in colour. No ComfyUI import: the node and the tests call it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

TOKEN_LIMIT = 77  # CLIP's context, including the start and end tokens

COLOURS = {  # frame colour per problem, most serious first
    "unreadable": (220, 30, 30),
    "unreadable mask": (220, 30, 30),
    "duplicate": (200, 60, 200),
    "no caption": (240, 140, 20),
    "empty caption": (240, 140, 20),
    "long caption": (230, 200, 30),
    "small": (60, 140, 240),
    "mask size": (60, 200, 200),
}


@dataclass
class ImageCheck:
    path: str
    rel: str
    caption: str
    width: int = 0
    height: int = 0
    error: str = ""
    pixel_hash: str = ""
    tokens: int | None = None
    mask: str = ""  # its mask file, relative to the dataset folder ("" when it has none)
    mask_width: int = 0
    mask_height: int = 0
    mask_error: str = ""
    has_alpha: bool = False  # transparency: a mask with alpha_mask on
    problems: list[str] = field(default_factory=list)
    thumbnail: object = None  # PIL image, for the grid


@dataclass
class DatasetReport:
    root: str
    resolution: int
    images: list[ImageCheck]
    repeats_total: int
    buckets: dict[tuple[int, int], int]
    duplicates: list[list[str]]
    small_limit: int

    def with_problem(self, problem: str) -> list[ImageCheck]:
        return [c for c in self.images if problem in c.problems]

    @property
    def unreadable(self) -> list[ImageCheck]:
        return self.with_problem("unreadable")

    def counts(self) -> dict[str, int]:
        return {p: len(self.with_problem(p)) for p in COLOURS}

    @property
    def num_masks(self) -> int:
        return sum(1 for c in self.images if c.mask)

    @property
    def num_alpha(self) -> int:
        return sum(1 for c in self.images if c.has_alpha)

    def text(self, limit: int = 8) -> str:
        n = len(self.images)
        lines = [f"{n} images, {self.repeats_total} samples per epoch (with repeats), folder {self.root}"]
        if self.buckets:
            buckets = ", ".join(f"{w}x{h}: {c}" for (w, h), c in sorted(self.buckets.items(), key=lambda kv: -kv[1]))
            lines.append(f"aspect buckets at {self.resolution} px (used with bucketing on): {buckets}")
        if self.num_masks:
            lines.append(f"masks: {self.num_masks} of {n} images have one (used with masked_loss on; "
                         "the others train whole)")
        if self.num_alpha:
            lines.append(f"transparency: {self.num_alpha} of {n} images (their alpha is the mask with alpha_mask on)")

        def section(title, checks, detail=lambda c: ""):
            if not checks:
                return
            lines.append(f"{title}: {len(checks)}")
            for c in checks[:limit]:
                lines.append(f"  - {c.rel}{detail(c)}")
            if len(checks) > limit:
                lines.append(f"  - ... and {len(checks) - limit} more")

        section("UNREADABLE (remove or re-save them; training refuses to start)", self.unreadable,
                lambda c: f": {c.error}")
        section("missing captions (add a .txt beside the image)", self.with_problem("no caption"))
        section("empty captions", self.with_problem("empty caption"))
        section(f"captions over {TOKEN_LIMIT} tokens (the text encoder ignores the rest)",
                self.with_problem("long caption"), lambda c: f": {c.tokens} tokens")
        section(f"very small images (short side under {self.small_limit} px; upscaled, blurry)",
                self.with_problem("small"), lambda c: f": {c.width}x{c.height}")
        section("UNREADABLE MASKS (re-save or remove them; with masked_loss on, training stops at them)",
                self.with_problem("unreadable mask"), lambda c: f" ({c.mask}): {c.mask_error}")
        section("masks of another size than their image (stretched to the image; check they belong to it)",
                self.with_problem("mask size"),
                lambda c: f": mask {c.mask_width}x{c.mask_height}, image {c.width}x{c.height}")
        if self.duplicates:
            lines.append(f"duplicate images (same pixels): {sum(len(g) for g in self.duplicates)} in {len(self.duplicates)} groups")
            for group in self.duplicates[:limit]:
                lines.append("  - " + " = ".join(group))
        if not any(c.problems for c in self.images):
            lines.append("no problems found")
        return "\n".join(lines)

    def grid(self, max_images: int = 64, cell: int = 128):
        """A contact sheet of the first ``max_images`` images; problem images framed in colour."""
        from PIL import Image, ImageDraw

        shown = self.images[:max_images]
        cols = max(1, math.ceil(math.sqrt(len(shown))))
        rows = max(1, math.ceil(len(shown) / cols))
        sheet = Image.new("RGB", (cols * cell, rows * cell), (32, 32, 32))
        draw = ImageDraw.Draw(sheet)
        for i, check in enumerate(shown):
            x, y = (i % cols) * cell, (i // cols) * cell
            if check.thumbnail is not None:
                thumb = check.thumbnail
                sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
            else:
                draw.line((x + 8, y + 8, x + cell - 8, y + cell - 8), fill=COLOURS["unreadable"], width=4)
                draw.line((x + 8, y + cell - 8, x + cell - 8, y + 8), fill=COLOURS["unreadable"], width=4)
            problem = next((p for p in COLOURS if p in check.problems), None)
            if problem:
                draw.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=COLOURS[problem], width=4)
                draw.rectangle((x + 4, y + cell - 16, x + cell - 4, y + cell - 4), fill=(0, 0, 0))
                draw.text((x + 6, y + cell - 16), problem, fill=COLOURS[problem])
        return sheet


def bucket_resolutions(resolution: int, step: int = 64, min_side: int = 256, max_side: int | None = None):
    """kohya's bucket list: sides multiples of ``step`` with area at most resolution**2."""
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def load_tokenizer(tokenizer_dir: str | None):
    if not tokenizer_dir:
        return None
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    except Exception:
        return None


def token_count(tokenizer, caption: str) -> int:
    """Tokens the text encoder sees, start and end included."""
    if tokenizer is None:
        return len(caption.replace(",", " , ").split()) + 2  # a word-level lower bound
    return len(tokenizer(caption, truncation=False)["input_ids"])


def check_mask(check: ImageCheck, mask_path: str, root: str) -> None:
    """The mask's size (upright, as trained) against its image's; an unreadable mask is a problem."""
    from ..training.dataset import DatasetError, load_mask

    check.mask = os.path.relpath(mask_path, root)
    try:
        check.mask_width, check.mask_height = load_mask(mask_path).size
    except DatasetError as e:
        check.mask_error = str(e)[:200]
        check.problems.append("unreadable mask")
        return
    if check.width and (check.mask_width, check.mask_height) != (check.width, check.height):
        check.problems.append("mask size")


def analyse_dataset(dataset, resolution: int = 512, tokenizer=None, thumb: int = 128) -> DatasetReport:
    """Open and check every image of a training.dataset.Dataset; see the module docstring."""
    from PIL import Image, ImageOps

    from ..training.dataset import has_alpha

    missing = {w[len("no caption for "):].split("; using")[0] for w in dataset.warnings if w.startswith("no caption for ")}
    small_limit = max(64, resolution // 2)
    buckets = bucket_resolutions(resolution)
    checks: list[ImageCheck] = []
    by_hash: dict[str, list[str]] = {}
    bucket_counts: dict[tuple[int, int], int] = {}
    for item in dataset.items:
        rel = os.path.relpath(item.image_path, dataset.root)
        check = ImageCheck(item.image_path, rel, item.caption)
        try:
            with Image.open(item.image_path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                check.has_alpha = has_alpha(img)
                img = img.convert("RGB")
            check.width, check.height = img.size
            digest = hashlib.sha256(f"{img.width}x{img.height}".encode())
            digest.update(img.tobytes())
            check.pixel_hash = digest.hexdigest()
            img.thumbnail((thumb, thumb))
            check.thumbnail = img
        except Exception as e:  # PIL raises many kinds for broken files
            check.error = f"{type(e).__name__}: {e}"[:200]
            check.problems.append("unreadable")
        if item.mask_path:
            check_mask(check, item.mask_path, dataset.root)
        if item.image_path in missing:
            check.problems.append("no caption")
        elif not item.caption.strip():
            check.problems.append("empty caption")
        elif item.caption:
            check.tokens = token_count(tokenizer, item.caption)
            if check.tokens > TOKEN_LIMIT:
                check.problems.append("long caption")
        if check.pixel_hash:
            by_hash.setdefault(check.pixel_hash, []).append(rel)
            if min(check.width, check.height) < small_limit:
                check.problems.append("small")
            bucket = nearest_bucket(check.width, check.height, buckets)
            bucket_counts[bucket] = bucket_counts.get(bucket, 0) + 1
        checks.append(check)
    duplicates = [group for group in by_hash.values() if len(group) > 1]
    dup_paths = {p for group in duplicates for p in group[1:]}
    for check in checks:
        if check.rel in dup_paths:
            check.problems.append("duplicate")
    return DatasetReport(
        root=dataset.root,
        resolution=resolution,
        images=checks,
        repeats_total=dataset.num_samples,
        buckets=bucket_counts,
        duplicates=duplicates,
        small_limit=small_limit,
    )


def image_tensor(pil_image):
    """PIL -> ComfyUI IMAGE: float32 [1, H, W, 3] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
