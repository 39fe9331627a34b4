"""Load Dataset: a folder under ComfyUI's input directory -> a dataset value and a short report."""

from __future__ import annotations

import os

from .spec import DATASET, In, NodeError, NodeResult, NodeSpec, Out, node_id


_TRAINING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training")
# Datasets that ship with the package (eight 96 px toy images with captions each), listed after the input
# folder's own so that the example workflows run out of the box. A bundled name wins over an input folder of
# the same name.
SAMPLE_DATASETS = {
    "sample: shapes": os.path.join(_TRAINING, "sample_dataset"),
    "sample: patterns": os.path.join(_TRAINING, "sample_patterns"),
}


def dataset_folders(host) -> list[str]:
    """Load Dataset's list: :func:`image_folders`, then the bundled samples (``SAMPLE_DATASETS``)."""
    return image_folders(host) + list(SAMPLE_DATASETS)


def image_folders(host) -> list[str]:
    """Sub-folders of the input directory that hold at least one image (recursively, 2 levels)."""
    from ..training.dataset import IMAGE_EXTENSIONS, MASK_FOLDER

    root = host.input_directory()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = os.path.relpath(dirpath, root).count(os.sep)
        # a dataset's masks/ folder holds its loss masks, not a dataset
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != MASK_FOLDER) if depth < 2 else []
        if dirpath != root and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            rel = os.path.relpath(dirpath, root)
            # an N_name folder's parent is the dataset (kohya layout)
            parent = os.path.dirname(rel)
            found.append(parent if parent and os.path.basename(rel)[:1].isdigit() else rel)
    return sorted(set(found))


def resolve_folder(host, folder: str) -> str:
    """A bundled sample, or a folder that lies inside the input directory (no '..', no absolute paths)."""
    if folder in SAMPLE_DATASETS:
        return SAMPLE_DATASETS[folder]
    root = os.path.realpath(host.input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or os.path.commonpath([root, path]) != root:
        raise NodeError(f"folder '{folder}': must be a folder inside ComfyUI's input directory ({root})")
    if not os.path.isdir(path):
        raise NodeError(f"folder '{folder}' not found in {root}; put your images there and refresh (press r)")
    return path


_TOKENIZERS: dict = {}


def tokenizer_for(host):
    """ComfyUI's bundled CLIP tokenizer (loaded once), for the caption-length check."""
    from .report import load_tokenizer

    try:
        path = host.tokenizer_dir()
    except Exception:
        return None
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


class LoadDataset(NodeSpec):
    """Loads a folder of captioned images from ComfyUI's input folder for Train LoRA, with a report."""

    node_id = node_id("LoadDataset")
    display_name = "Load Dataset (LoRA Trainer)"
    description = (
        "A folder inside ComfyUI's input folder: images with same-name .txt/.caption files, or a "
        "metadata.jsonl/metadata.csv; kohya-style N_name subfolders repeat their images N times. The report "
        "lists unreadable, tiny and duplicate images, missing/empty/over-long captions and the buckets; the "
        "preview grid frames problem images in colour."
    )
    inputs = [
        In("folder", "COMBO", options=dataset_folders,
           tooltip="a folder inside ComfyUI's input folder, or a bundled sample (sample: ...) to try things out"),
        In(
            "resolution", "INT", default=512, min=64, max=4096, step=64, optional=True,
            tooltip="the training resolution, for the report's buckets and small-image check",
        ),
    ]
    outputs = [
        Out("dataset", DATASET),
        Out("report", "STRING", "what the checks found (also shown on the node)"),
        Out("preview", "IMAGE", "a grid of the images; problem images framed in colour"),
    ]

    @staticmethod
    def fingerprint(host, folder: str, resolution: int = 512):
        # Re-run when any image or caption changes, not only when the folder name does.
        from ..training.dataset import DatasetError, load_dataset

        try:
            return f"{load_dataset(resolve_folder(host, folder)).fingerprint()}:{resolution}"
        except (DatasetError, NodeError) as e:
            return str(e)

    @classmethod
    def execute(cls, host, folder: str, resolution: int = 512) -> NodeResult:
        from ..training.dataset import DatasetError, load_dataset
        from .report import analyse_dataset, image_tensor

        try:
            dataset = load_dataset(resolve_folder(host, folder))
        except DatasetError as e:
            raise NodeError(str(e)) from None
        report = analyse_dataset(dataset, resolution, tokenizer_for(host))
        dataset.report = report  # Train LoRA refuses a dataset with unreadable images before loading a model
        text = report.text()
        grid = report.grid()
        ui = {"text": [text]}
        try:
            ui["images"] = [host.save_temp_image(grid, "loratrainer/dataset")]
        except Exception:  # no temp folder (scripts): the IMAGE output still carries the grid
            pass
        return NodeResult((dataset, text, image_tensor(grid)), ui=ui)
