"""Print the README's "Supported models" table from the architecture matrix.

    .venv/bin/python tests/gen_support_table.py

For each family of tests/arch_models.py it builds the tiny checkpoint, loads it through
posttrain's loader and asks posttrain.models.attention_support which fast paths apply. Each
"on" cell is a path whose equality test_architectures.py checks for that family (packed ==
padded, shared == per-sample, engine == HF); every trainer runs on every family in
test_architecture_trainers.py (slow); a fast path that steps aside says why at start-up.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NOTES = {
    "gemma2-softcap": "attention soft-capping needs `attn_implementation: eager`",
    "gemma3-window": "sliding + full layers: per-layer-type masks",
    "mistral-window": "sliding window on every layer",
    "opt": "ignores position_ids for packing: explicit block mask",
    "gpt2": "learned absolute positions",
    "llama-tied": "tied embeddings",
}


def rows() -> list[str]:
    from arch_models import FAMILIES, attn_of, build_family

    from posttrain.config import ModelConfig
    from posttrain.models import attention_support as a
    from posttrain.models.loading import load_causal_lm
    from posttrain.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=512)
    root = Path(tempfile.mkdtemp())
    out = [
        "| family (transformers class) | attention | SFT packing "
        "| prefix-shared packing (dpo, rm) / shared-prompt forward (grpo) "
        "| prompt-shared decode | notes |",
        "|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        path = build_family(family, root / family, tokenizer)
        attn = attn_of(path)
        model = load_causal_lm(ModelConfig(name_or_path=str(path), attn_implementation=attn))
        prof = a.profile(model)
        mode, packing_off = a.sft_packing(prof)
        packing = {"positions": "on", "block_mask": "on (block mask)"}.get(mode, "off")
        custom = "off: " + r if (r := a.custom_mask(prof)) else "on"
        if custom == "on" and prof.windowed:
            custom = "on (windowed masks)"
        decode = "off: " + r if (r := a.shared_decode(prof)) else "on"
        out.append(
            f"| {family} ({type(model).__name__}) | {attn} | {packing} | {custom} "
            f"| {decode} | {NOTES.get(family, '')} |"
        )
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
