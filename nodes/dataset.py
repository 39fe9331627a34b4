"""Load Dataset: a folder under ComfyUI's input directory -> a dataset value and a short report."""

from __future__ import annotations

import os

from .spec import DATASET, In, NodeError, NodeResult, NodeSpec, Out, node_id


def dataset_folders(host) -> list[str]:
    """Sub-folders of the input directory that hold at least one image (recursively, 2 levels)."""
    from ..training.dataset import IMAGE_EXTENSIONS

    root = host.input_directory()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = os.path.relpath(dirpath, root).count(os.sep)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < 2 else []
        if dirpath != root and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            rel = os.path.relpath(dirpath, root)
            # an N_name folder's parent is the dataset (kohya layout)
            parent = os.path.dirname(rel)
            found.append(parent if parent and os.path.basename(rel)[:1].isdigit() else rel)
    return sorted(set(found)) or ["(put a folder of images into ComfyUI's input folder)"]


def resolve_folder(host, folder: str) -> str:
    """The dataset folder must lie inside the input directory (no '..', no absolute paths)."""
    root = os.path.realpath(host.input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or os.path.commonpath([root, path]) != root:
        raise NodeError(f"folder '{folder}': must be a folder inside ComfyUI's input directory ({root})")
    if not os.path.isdir(path):
        raise NodeError(f"folder '{folder}' not found in {root}; put your images there and refresh (press r)")
    return path


def dataset_report(dataset) -> str:
    missing = sum(1 for w in dataset.warnings if w.startswith("no caption"))
    lines = [
        f"{dataset.num_images} images, {dataset.num_samples} samples per epoch (with repeats)",
        f"folders: " + ", ".join(f"{k} (x{v['n_repeats']}, {v['img_count']} images)" for k, v in dataset.subsets().items()),
    ]
    if missing:
        lines.append(f"{missing} images without a caption file")
    lines.extend(dataset.warnings[:10])
    return "\n".join(lines)


class LoadDataset(NodeSpec):
    """Loads a folder of captioned images from ComfyUI's input folder for Train LoRA."""

    node_id = node_id("LoadDataset")
    display_name = "Load Dataset (LoRA Trainer)"
    description = (
        "A folder inside ComfyUI's input folder: images with same-name .txt/.caption files, or a "
        "metadata.jsonl/metadata.csv; kohya-style N_name subfolders repeat their images N times."
    )
    inputs = [In("folder", "COMBO", options=dataset_folders, tooltip="a folder inside ComfyUI's input folder")]
    outputs = [Out("dataset", DATASET), Out("report", "STRING")]

    @staticmethod
    def fingerprint(host, folder: str):
        # Re-run when any image or caption changes, not only when the folder name does.
        from ..training.dataset import DatasetError, load_dataset

        try:
            return load_dataset(resolve_folder(host, folder)).fingerprint()
        except (DatasetError, NodeError) as e:
            return str(e)

    @classmethod
    def execute(cls, host, folder: str) -> NodeResult:
        from ..training.dataset import DatasetError, load_dataset

        try:
            dataset = load_dataset(resolve_folder(host, folder))
        except DatasetError as e:
            raise NodeError(str(e)) from None
        report = dataset_report(dataset)
        return NodeResult((dataset, report), ui={"text": [report]})
