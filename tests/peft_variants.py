"""The peft adapter of every export variant, on a shared set of tiny-model targets (used by the format and
continue-training tests)."""

UNET_LINEAR = ["to_q", "to_v", "to_out.0", "proj_in", "ff.net.2", "time_emb_proj"]
UNET_CONV = ["conv1", "conv_shortcut"]
TE = ["q_proj", "fc1"]


def peft_configs(lora_rslora: bool = False) -> dict:
    """variant -> (target module names -> peft config); LoCon, LoHa, LoKr and DoRA also take the ResNet convs."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return {
        "lora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False,
                                     use_rslora=lora_rslora),
        "locon": lambda t: LoraConfig(r=4, lora_alpha=2, target_modules=t + UNET_CONV, init_lora_weights=False,
                                      rank_pattern={r".*conv1": 2}, alpha_pattern={r".*conv1": 1.0}),
        "loha": lambda t: LoHaConfig(r=3, alpha=6, target_modules=t + UNET_CONV, init_weights=False),
        "loha_tucker": lambda t: LoHaConfig(r=2, alpha=3, target_modules=t + UNET_CONV, init_weights=False,
                                            use_effective_conv2d=True),
        "lokr": lambda t: LoKrConfig(r=2, alpha=4, target_modules=t + UNET_CONV, init_weights=False,
                                     decompose_both=True),
        "lokr_full": lambda t: LoKrConfig(r=64, alpha=4, target_modules=t, init_weights=False),
        "dora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t + UNET_CONV, init_lora_weights=False,
                                     use_dora=True),
    }
