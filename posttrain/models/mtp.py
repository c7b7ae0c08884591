"""Multi-token prediction heads on any causal LM (spec section 11), saved beside the checkpoint.

Both kinds read h^0, the hidden state the LM head consumes (after the final norm), captured by a
forward hook on `get_output_embeddings()`, so the main logits are computed by the model's own
forward (whatever post-processing it does) and the heads need no model-specific code. They share
the model's input embedding and output head, which are passed in at call time and never stored,
so `mtp_heads.safetensors` holds only the heads' own weights.

- Medusa (Cai et al. 2024): head k (1-based) predicts t_{i+k+1} from h^0_i through a residual
  SiLU block: p^(k) = softmax(W_out (h + SiLU(W_k h + b_k))). W_k, b_k start at zero, so every
  head starts as the main head (the paper's initialisation).
- DeepSeek-V3 MTP (DeepSeek-AI 2024, section 2.2): module k combines RMSNorm(h^{k-1}_i) and
  RMSNorm(Emb(t_{i+k})) through a linear projection, runs one transformer block, and predicts
  t_{i+k+1} through its own final RMSNorm and the shared output head. Deviation: the block is a
  small self-contained pre-norm block (causal multi-head attention with RoPE, SwiGLU MLP), not the
  model's own decoder layer, so its KV cache during speculative decoding is ours to manage
  (posttrain/rollout/speculative.py) whatever the architecture.

`MTPCausalLM` wraps model + heads into one module for training (DDP and the optimizer see the
heads); `save_heads` / `load_heads` write and read OUTPUT_DIR/final/mtp_heads.safetensors and
mtp_config.json, so the Hugging Face directory itself stays a plain checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from posttrain.config import MTPConfig

HEADS_FILE = "mtp_heads.safetensors"
CONFIG_FILE = "mtp_config.json"


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half form). x: (B, heads, S, D); positions: (B, S)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    angles = positions.float().unsqueeze(-1) * freqs  # (B, S, D/2)
    cos, sin = angles.cos().unsqueeze(1).to(x.dtype), angles.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVBuffer:
    """Keys/values (B, heads, capacity, D) of one MTP block during decoding; slots are appended in
    lockstep with the main model's cache and masked by the same key mask."""

    def __init__(self):
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + keys.shape[-2]
        if self.keys is None or end > self.keys.shape[-2]:
            capacity = max(end, 2 * self.length, 64)
            grown_k = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
            grown_v = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
            if self.keys is not None:
                grown_k[:, :, : self.length] = self.keys[:, :, : self.length]
                grown_v[:, :, : self.length] = self.values[:, :, : self.length]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select(self, rows: Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


class Block(nn.Module):
    """Pre-norm transformer block: causal attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float, theta: float):
        super().__init__()
        self.heads, self.theta = heads, theta
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=eps)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, mask: Tensor, kv: KVBuffer | None = None
    ) -> Tensor:
        """x: (B, S, H); positions: (B, S); mask: (B, 1, S, L) bool, True = may attend, over the
        L keys (L = S without `kv`, else the cached slots plus these S)."""
        batch, width, hidden = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x)).view(batch, width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )  # each (B, heads, S, D)
        q, k = _rope(q, positions, self.theta), _rope(k, positions, self.theta)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, heads, L, D)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, S, D)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, width, hidden))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class DeepSeekModule(nn.Module):
    """One DeepSeek-V3 MTP module: h^k = Block(W [RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))])."""

    def __init__(self, config, hidden: int):
        super().__init__()
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.hidden_norm = nn.RMSNorm(hidden, eps=eps)
        self.embed_norm = nn.RMSNorm(hidden, eps=eps)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = Block(
            hidden,
            config.num_attention_heads,
            config.intermediate_size,
            eps,
            float(getattr(config, "rope_theta", None) or 10000.0),
        )
        self.out_norm = nn.RMSNorm(hidden, eps=eps)

    def forward(self, prev, token_embeds, positions, mask, kv=None) -> Tensor:
        """prev h^{k-1}: (B, S, H); token_embeds Emb(t_{i+k}): (B, S, H) -> h^k (B, S, H)."""
        joined = torch.cat([self.hidden_norm(prev), self.embed_norm(token_embeds)], dim=-1)
        return self.block(self.proj(joined), positions, mask, kv)


class MTPHeads(nn.Module):
    """K extra heads of one kind; `forward` gives each head's logits for training."""

    def __init__(self, config, mtp: MTPConfig):
        super().__init__()
        if mtp.kind not in ("deepseek", "medusa") or mtp.depth < 1:
            raise ValueError(f"no MTP heads for kind={mtp.kind!r}, depth={mtp.depth}")
        self.kind, self.depth = mtp.kind, mtp.depth
        hidden = config.hidden_size
        if self.kind == "medusa":
            self.medusa = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(mtp.depth))
            for layer in self.medusa:  # each head starts as the main head
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            self.modules_k = nn.ModuleList(DeepSeekModule(config, hidden) for _ in range(mtp.depth))
            for name, param in self.modules_k.named_parameters():
                if param.ndim == 2:  # HF-style init; residual outputs start at zero
                    if name.endswith(("out.weight", "down.weight")):
                        nn.init.zeros_(param)
                    else:
                        nn.init.normal_(param, std=getattr(config, "initializer_range", 0.02))

    def medusa_hidden(self, k: int, h0: Tensor) -> Tensor:
        """Head k's (0-based) pre-LM-head state h + SiLU(W_k h + b_k); h0: (..., H)."""
        return h0 + F.silu(self.medusa[k](h0))

    def forward(
        self,
        h0: Tensor,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        embed: nn.Module,
        lm_head: nn.Module,
    ) -> list[Tensor]:
        """Logits (B, T, V) of each head at every position; head k (0-based) at position i
        predicts t_{i+k+2} (targets: posttrain.losses.mtp.mtp_labels). h0: (B, T, H)."""
        if self.kind == "medusa":
            return [lm_head(self.medusa_hidden(k, h0)) for k in range(self.depth)]
        mask = training_mask(position_ids, attention_mask)  # (B, 1, T, T)
        logits, prev = [], h0
        for k, module in enumerate(self.modules_k):
            # t_{i+k+1} for 0-based k; the last k+1 positions get padding: their targets are
            # ignored, and a position only attends to earlier ones, so nothing valid sees them
            shifted = F.pad(input_ids[:, k + 1 :], (0, k + 1), value=0)  # (B, T)
            prev = module(prev, embed(shifted), position_ids, mask)
            logits.append(lm_head(module.out_norm(prev)))
        return logits


def training_mask(position_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, 1, T, T) bool: causal, within one packed example (position ids restart at 0), real
    keys only; the diagonal always, so no query row is empty (an empty row gives NaN in SDPA)."""
    width = position_ids.shape[1]
    example = (position_ids == 0).long().cumsum(dim=1)  # (B, T) packed-example index
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    mask = causal & (example.unsqueeze(2) == example.unsqueeze(1))  # (B, T, T)
    if attention_mask is not None:
        mask = mask & attention_mask.bool().unsqueeze(1)
    mask = mask | torch.eye(width, dtype=torch.bool, device=mask.device)
    return mask.unsqueeze(1)


class capture_lm_head_input:  # noqa: N801 (used as a context manager)
    """Context manager: records the input of the model's output head (the normed h^0)."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()
        self.hidden: Tensor | None = None

    def _hook(self, module, args):
        self.hidden = args[0]

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class MTPCausalLM(nn.Module):
    """A causal LM plus its MTP heads as one trainable module; `forward` returns
    (main logits (B, T, V), [head logits (B, T, V)] * K)."""

    def __init__(self, base: nn.Module, heads: MTPHeads):
        super().__init__()
        self.base, self.heads = base, heads

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        with capture_lm_head_input(self.base) as captured:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **kwargs,
            )
        head_logits = self.heads(
            captured.hidden,
            input_ids,
            position_ids,
            attention_mask,
            self.base.get_input_embeddings(),
            self.base.get_output_embeddings(),
        )
        return out.logits, head_logits

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.base.gradient_checkpointing_enable(**kwargs)


def mtp_config_of(path: str | Path) -> MTPConfig | None:
    """The MTPConfig saved in a model directory, or None when it has no heads."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file() or not (Path(path) / HEADS_FILE).is_file():
        return None
    data = json.loads(file.read_text())
    return MTPConfig(**{k: data[k] for k in ("kind", "depth", "weight") if k in data})


def save_heads(
    heads: MTPHeads, mtp: MTPConfig, path: str | Path, state_dict: dict | None = None
) -> None:
    """Write the heads (`state_dict`: their full weights when gathered from shards)."""
    path = Path(path)
    source = state_dict if state_dict is not None else heads.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    save_file(state, str(path / HEADS_FILE))
    (path / CONFIG_FILE).write_text(
        json.dumps({"kind": mtp.kind, "depth": mtp.depth, "weight": mtp.weight}, indent=1)
    )


def load_heads(model, path: str | Path, mtp: MTPConfig | None = None) -> MTPHeads | None:
    """Heads saved in `path` for `model` (on its device and dtype), or None if there are none.
    With `mtp`, its kind and depth must match the saved ones."""
    saved = mtp_config_of(path)
    if saved is None:
        return None
    if mtp is not None and (mtp.kind, mtp.depth) != (saved.kind, saved.depth):
        raise ValueError(
            f"{path}: saved MTP heads are kind={saved.kind} depth={saved.depth}, the recipe asks "
            f"for kind={mtp.kind} depth={mtp.depth}"
        )
    heads = MTPHeads(model.config, saved)
    heads.load_state_dict(load_file(str(Path(path) / HEADS_FILE)))
    param = next(model.parameters())
    return heads.to(device=param.device, dtype=param.dtype)


def build_heads(model, mtp: MTPConfig, path: str | Path) -> MTPHeads:
    """Heads for training: loaded from `path` when saved there, else freshly initialised."""
    heads = load_heads(model, path, mtp)
    if heads is None:
        param = next(model.parameters())
        heads = MTPHeads(model.config, mtp).to(device=param.device, dtype=param.dtype)
    return heads
