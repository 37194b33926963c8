from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import UserError
from .base import Defense


def apply_lora(model, r: int, alpha: int, dropout: float = 0.0, target_modules: list[str] | None = None,
               modules_to_save: bool = True):
    """PEFT LoRA on `model`, base weights frozen. With `modules_to_save` PEFT's SEQ_CLS task keeps a
    trainable copy of the classification head (saved in the adapter); without it only LoRA trains and
    the head is left to the caller."""
    from peft import LoraConfig, TaskType, get_peft_model

    # PEFT reads a string as one regex over whole module names, so "query" alone matches nothing; a plain
    # comma list of names ("query,value", as --option gives it) means those modules, as the list form does
    if isinstance(target_modules, str) and re.fullmatch(r"\s*\w+(\s*,\s*\w+)*\s*", target_modules):
        target_modules = [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(task_type=TaskType.SEQ_CLS if modules_to_save else None, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=target_modules)
    try:
        with quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:  # target modules the backbone does not have; its names are known only here
        raise UserError(f"option target_modules={target_modules}: {str(e).splitlines()[0]}") from None


@contextmanager
def quiet_peft():
    """PEFT 0.21 calls an attribute transformers 5 deprecates, once per LoRA model it builds or loads: a notice
    for PEFT's developers that every LoRA run (a sweep worker's too) and every adapter load would otherwise print."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@dataclass
class LoRA(Defense):
    """PEFT LoRA on the attention projections; the base model is frozen.

    `train_head` keeps the classification head trainable (PEFT's SEQ_CLS default). The MuScleLoRA code
    freezes the head at its random initialisation instead; set it to False to reproduce that (the
    paper's LoRA baseline: also pass --lr 2e-5 --epochs 10 and weight_decay=0, warmup_ratio=0).
    """

    # 2e-3 was chosen for MiniLM on clean dev accuracy (benchmarks/muscle_tune.py --defense lora: clean sst2,
    # 2,000 samples, 2 epochs): seed 0 gave 0.8016 at 5e-4, 0.8383 at 1e-3, 0.8509 at 2e-3, 0.8429 at 3e-3,
    # 0.8268 at 5e-3, 0.7294 at 1e-2; seed 1 0.7936, 0.8188, 0.8314, 0.8222 at 5e-4, 1e-3, 2e-3, 3e-3; the
    # default 3 epochs (seed 0) 0.8372 at 5e-4, 0.8544 at 2e-3. Only the adapter and the head learn, so it
    # takes a larger step than full fine-tuning's 1.5e-4.
    lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # None: PEFT's default for the architecture (BERT: query, value); "query,value" or a list names modules,
    # any other string is PEFT's regex over whole module names
    target_modules: str | list[str] | None = None
    train_head: bool = True

    name = "lora"
    bounds = {"lora_r": "(0, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)"}

    def prepare_model(self, model, tokenizer, train_data):
        model = apply_lora(model, self.lora_r, self.lora_alpha, self.lora_dropout, self.target_modules)
        if not self.train_head:
            for name, p in model.named_parameters():
                if "modules_to_save" in name or name.split(".")[-2] in ("classifier", "score"):
                    p.requires_grad = False
        return model
