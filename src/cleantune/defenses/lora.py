from __future__ import annotations

from dataclasses import dataclass, field

from .base import Defense


@dataclass
class LoRA(Defense):
    """PEFT LoRA on the attention projections; the base model is frozen.

    `train_head` keeps the classification head trainable (PEFT's SEQ_CLS default). The MuScleLoRA code
    freezes the head at its random initialisation instead; set it to False to reproduce that.
    """

    lr: float = 5e-4
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture (BERT: query, value)
    train_head: bool = True

    name = "lora"

    def prepare_model(self, model, tokenizer, train_data):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.lora_r, lora_alpha=self.lora_alpha,
                            lora_dropout=self.lora_dropout, target_modules=self.target_modules)
        model = get_peft_model(model, config)
        if not self.train_head:
            for name, p in model.named_parameters():
                if "modules_to_save" in name or name.split(".")[-2] in ("classifier", "score"):
                    p.requires_grad = False
        return model
