"""`posttrain merge`: fold a LoRA adapter into its base weights (peft merge_and_unload)."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.models.loading import ModelError


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    task = json.loads(config_path.read_text()).get("task_type")
    auto = AutoPeftModelForSequenceClassification if task == "SEQ_CLS" else AutoPeftModelForCausalLM
    model = auto.from_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    return out
