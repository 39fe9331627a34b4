"""Run by tests/test_accelerate_multiprocess.py under ``accelerate launch``: the CLI's train command, then
each process writes its own adapter weights (rank<N>.safetensors) so the test can compare the ranks."""

import os
import sys

from safetensors.torch import save_file

from comfyui_lora_trainer.training import cli, loop

config_path, out_dir = sys.argv[1], sys.argv[2]
results = []
original = loop.train


def capturing_train(*args, **kwargs):
    results.append(original(*args, **kwargs))
    return results[-1]


loop.train = capturing_train
code = cli.main(["train", config_path])
rank = int(os.environ.get("RANK", "0"))
save_file({k: v.contiguous() for k, v in results[0].lora.tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
print(f"rank {rank} losses {results[0].losses} processes {results[0].stats.get('processes')}", flush=True)
sys.exit(code)
