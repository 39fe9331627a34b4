"""The ComfyUI layer: node descriptions (one file per node family) and their registration."""

from .apply import ApplyLoRA
from .dataset import LoadDataset
from .inspect import LoRAInfo
from .merge import MergeLoRAs
from .options import TrainingOptions
from .train import TrainLoRA

NODE_SPECS = [LoadDataset, TrainLoRA, TrainingOptions, ApplyLoRA, MergeLoRAs, LoRAInfo]


def LoraTrainerExtension():
    from .host import comfy_extension

    return comfy_extension(NODE_SPECS)
