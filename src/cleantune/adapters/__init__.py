"""Adapters of our own, shaped like PEFT tuners (config, a layer wrapping a base layer, model wiring,
save/load of the adapter alone, merge for export). PEFT itself provides LoRA."""

from .mslr import (CausalLMHead, MSLRConfig, MSLRLinear, attach_causal_head, backbone_family, inject_mslr,
                   load_classifier, merge_mslr, published_mslr, register, save_adapter)

__all__ = ["CausalLMHead", "MSLRConfig", "MSLRLinear", "attach_causal_head", "backbone_family", "inject_mslr",
           "load_classifier", "merge_mslr", "published_mslr", "register", "save_adapter"]
