"""Baichuan2-13B as a native transformers class: Llama-style layers whose attention has ALiBi instead of RoPE.

No class in transformers combines RMSNorm + SwiGLU + ALiBi, and Baichuan's own remote code no longer runs on current
transformers, so the converted 13B checkpoint loads into this class. Importing this module registers it with
AutoConfig / AutoModelForCausalLM (model_type "baichuan_alibi"), which is all `from_pretrained`, PEFT, TRL,
generation and `save_pretrained` need. The ALiBi slopes are computed in `forward` (never a buffer): transformers 5
builds models on the meta device, and a non-persistent buffer made in `__init__` would come back uninitialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, eager_attention_forward
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

MODEL_TYPE = "baichuan_alibi"


@strict
class BaichuanAlibiConfig(PreTrainedConfig):
    """Baichuan2-13B's published config facts under their Llama names (max_position_embeddings = model_max_length)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 125696
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    # LlamaMLP reads these; Baichuan has no biases anywhere.
    @property
    def mlp_bias(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Baichuan's `_get_interleave` (BLOOM's recipe): the geometric series for the largest power of two p <= n,
    then the even-indexed slopes of the 2p series for the remaining heads. 5 heads -> [1/4, 1/16, 1/64, 1/256, 1/2]."""

    def series(p: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(p) - 3)))
        return [start * start**k for k in range(p)]

    p = 2 ** math.floor(math.log2(num_heads))
    slopes = series(p) + series(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_mask(attention_mask: torch.Tensor | None, num_heads: int, q_len: int, past: int,
               dtype: torch.dtype, device: torch.device, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [batch|1, heads, q_len, past+q_len] mask: slope * (j - i) where key j may be seen by query i.

    The original adds slope * j in eval and slope * (j - i) in training; both are equal after softmax. Queries sit
    at absolute positions past..past+q_len-1, so a KV cache keeps the same bias as one full forward.
    """
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    bias = alibi_slopes(num_heads).to(device)[:, None, None] * (k_pos - q_pos).to(torch.float32)
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    elif position_ids is not None and past == 0:
        # Padding-free packed rows: positions restart at 0 for each example, which may see only itself.
        segment = (position_ids == 0).cumsum(-1)
        allowed = allowed & (segment[:, None, :, None] == segment[:, None, None, :])
    return torch.where(allowed, bias[None].to(dtype), torch.finfo(dtype).min)


class BaichuanAlibiAttention(nn.Module):
    """Multi-head attention without rotary embedding: position enters only through the ALiBi mask."""

    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Cache | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class BaichuanAlibiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    config: BaichuanAlibiConfig
    config_class = BaichuanAlibiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True  # SDPA and eager take the additive ALiBi mask; flash/flex attention cannot
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_record_outputs = {"hidden_states": BaichuanAlibiDecoderLayer, "attentions": BaichuanAlibiAttention}


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("BaichuanAlibiModel takes a 2-D padding mask [batch, keys]; it builds the ALiBi mask")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask = alibi_mask(attention_mask, self.config.num_attention_heads, inputs_embeds.shape[1], past,
                          inputs_embeds.dtype, inputs_embeds.device, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


AutoConfig.register(MODEL_TYPE, BaichuanAlibiConfig, exist_ok=True)
AutoModel.register(BaichuanAlibiConfig, BaichuanAlibiModel, exist_ok=True)
AutoModelForCausalLM.register(BaichuanAlibiConfig, BaichuanAlibiForCausalLM, exist_ok=True)
