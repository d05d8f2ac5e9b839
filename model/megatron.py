"""The Megatron-core side of the model: our ModelConfig as a Megatron GPT (Llama-style) config, and checkpoint
conversion between Hugging Face Llama names (ours) and Megatron-core's layout, both ways.

Layout (megatron-core 0.16 GPTModel; the same mapping as Megatron-Bridge's Llama bridge):
  model.embed_tokens.weight                      <-> embedding.word_embeddings.weight
  model.layers.i.input_layernorm.weight          <-> decoder.layers.i.input_layernorm.weight              (local spec)
                                                     decoder.layers.i.self_attention.linear_qkv.layer_norm_weight (TE)
  q_proj, k_proj, v_proj                          <-> decoder.layers.i.self_attention.linear_qkv.weight, fused by
      query group: for each of the G = num_key_value_heads groups, its H/G query heads, then its k head, then its v
      head, each head_dim rows: [G x (H/G + 2) x head_dim, hidden]  (what Megatron's get_query_key_value_tensors splits)
  o_proj                                          <-> decoder.layers.i.self_attention.linear_proj.weight
  model.layers.i.post_attention_layernorm.weight <-> decoder.layers.i.pre_mlp_layernorm.weight            (local spec)
                                                     decoder.layers.i.mlp.linear_fc1.layer_norm_weight    (TE)
  gate_proj, up_proj                              <-> decoder.layers.i.mlp.linear_fc1.weight = [gate; up] (rows)
  down_proj                                       <-> decoder.layers.i.mlp.linear_fc2.weight
  model.norm.weight                               <-> decoder.final_layernorm.weight
  lm_head.weight                                  <-> output_layer.weight      (untied: RECIPE.md)

The conversion is a pure permutation of tensors (no arithmetic), so HF -> Megatron -> HF is exact. megatron-core is
needed only to build the Megatron model (`build_gpt_model`); the mapping itself imports nothing from it. The full
(TP = PP = 1) state dict is split for a parallel run by slicing only: tp_shard / tp_unshard (tensor parallel, how
Megatron's Column / Row / VocabParallel layers split each tensor) and pp_shard / pp_unshard (pipeline stages: a
contiguous block of layers per stage, renumbered from 0 as a stage's TransformerBlock names them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig

_LAYER = "model.layers.{i}."
_MLAYER = "decoder.layers.{i}."
_EXTRA = "._extra_state"


@dataclass(frozen=True)
class MegatronParallel:
    """Parallel sizes and memory knobs the Megatron run takes from params (pretrain.megatron at 3b)."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None      # None | "selective" | "full"
    recompute_method: str | None = None           # "uniform" | "block" with "full"
    recompute_num_layers: int | None = None


def transformer_config_kwargs(cfg: ModelConfig, par: MegatronParallel = MegatronParallel(),
                              dtype: torch.dtype = torch.float32, cpu: bool = False) -> dict:
    """Keyword arguments of megatron.core TransformerConfig for our architecture: RMSNorm, SwiGLU (gated SiLU),
    no biases, GQA (num_query_groups = num_key_value_heads), head_dim as kv_channels, no dropout. Fusions that need
    CUDA kernels are off when `cpu`."""
    import torch.nn.functional as F
    kwargs = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.initializer_range,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size, sequence_parallel=par.sequence_parallel,
        recompute_granularity=par.recompute_granularity, recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers, pipeline_dtype=dtype)
    if cpu:
        kwargs.update(use_cpu_initialization=True, batch_p2p_sync=False, persist_layer_norm=False, apply_rope_fusion=False,
                      masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                      gradient_accumulation_fusion=False)
    return kwargs


def build_gpt_model(cfg: ModelConfig, par: MegatronParallel = MegatronParallel(), dtype: torch.dtype = torch.float32,
                    cpu: bool = False, transformer_engine: bool = False, pre_process: bool = True,
                    post_process: bool = True):
    """A megatron.core GPTModel of our shape (model-parallel state must be initialized by the caller); one pipeline
    stage of it when `pre_process` (embedding: the first stage) or `post_process` (final norm, output layer and
    loss: the last stage) is False; the stage's layers are Megatron's choice from the model-parallel state, the
    block pp_layers names."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    config = TransformerConfig(**transformer_config_kwargs(cfg, par, dtype, cpu))
    return GPTModel(config, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=cfg.rope_theta, rotary_percent=1.0,
                    share_embeddings_and_output_weights=cfg.tie_word_embeddings, pre_process=pre_process,
                    post_process=post_process)


def _norm_names(te: bool) -> tuple[str, str]:
    if te:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[q; k; v] rows regrouped per query group (module docstring)."""
    g, d = cfg.num_key_value_heads, cfg.head_dim
    per = cfg.num_attention_heads // g
    hidden = q.shape[1]
    return torch.cat([q.view(g, per * d, hidden), k.view(g, d, hidden), v.view(g, d, hidden)], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of fuse_qkv."""
    g, d = cfg.num_key_value_heads, cfg.head_dim
    per = cfg.num_attention_heads // g
    hidden = qkv.shape[1]
    q, k, v = qkv.view(g, (per + 2) * d, hidden).split([per * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def hf_to_megatron(state: dict[str, torch.Tensor], cfg: ModelConfig, te: bool = False) -> dict[str, torch.Tensor]:
    """Our (HF Llama) state dict -> Megatron-core GPTModel's (TP = PP = 1); every input tensor is used exactly once."""
    state = dict(state)
    out = {"embedding.word_embeddings.weight": state.pop("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": state.pop("model.norm.weight")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    else:
        out["output_layer.weight"] = state.pop("lm_head.weight")
    attn_norm, mlp_norm = _norm_names(te)
    for i in range(cfg.num_hidden_layers):
        h, m = _LAYER.format(i=i), _MLAYER.format(i=i)
        out[m + attn_norm] = state.pop(h + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(state.pop(h + "self_attn.q_proj.weight"),
                                                              state.pop(h + "self_attn.k_proj.weight"),
                                                              state.pop(h + "self_attn.v_proj.weight"), cfg)
        out[m + "self_attention.linear_proj.weight"] = state.pop(h + "self_attn.o_proj.weight")
        out[m + mlp_norm] = state.pop(h + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([state.pop(h + "mlp.gate_proj.weight"),
                                                      state.pop(h + "mlp.up_proj.weight")], dim=0)
        out[m + "mlp.linear_fc2.weight"] = state.pop(h + "mlp.down_proj.weight")
    if state:
        raise KeyError(f"hf_to_megatron: tensors with no Megatron counterpart: {sorted(state)}")
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, te: bool = False) -> dict[str, torch.Tensor]:
    """Megatron-core GPTModel's state dict (TP = PP = 1) -> ours; Megatron's `_extra_state` entries are dropped."""
    state = {k: v for k, v in state.items() if not k.endswith(_EXTRA)}
    out = {"model.embed_tokens.weight": state.pop("embedding.word_embeddings.weight"),
           "model.norm.weight": state.pop("decoder.final_layernorm.weight")}
    if "output_layer.weight" in state:
        out["lm_head.weight"] = state.pop("output_layer.weight")
    attn_norm, mlp_norm = _norm_names(te)
    ffn = cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        h, m = _LAYER.format(i=i), _MLAYER.format(i=i)
        out[h + "input_layernorm.weight"] = state.pop(m + attn_norm)
        q, k, v = split_qkv(state.pop(m + "self_attention.linear_qkv.weight"), cfg)
        out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"], out[h + "self_attn.v_proj.weight"] = q, k, v
        out[h + "self_attn.o_proj.weight"] = state.pop(m + "self_attention.linear_proj.weight")
        out[h + "post_attention_layernorm.weight"] = state.pop(m + mlp_norm)
        gate, up = state.pop(m + "mlp.linear_fc1.weight").split([ffn, ffn], dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = state.pop(m + "mlp.linear_fc2.weight")
    if state:
        raise KeyError(f"megatron_to_hf: tensors with no HF counterpart: {sorted(state)}")
    return out


# Tensor parallelism of the unsharded state dict (the pretrain Megatron backend at TP > 1; pipeline stages:
# pp_shard below): how megatron.core's Column / Row / VocabParallel layers split each tensor -- rows of the
# column-parallel and vocab-parallel weights, columns of the row-parallel ones; norms are replicated. Slicing and
# concatenation only, so tp_unshard(tp_shard(...)) is exact.
_TP_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "self_attention.linear_qkv.weight")
_TP_COLS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_TP_GATED = "mlp.linear_fc1.weight"   # [gate; up]: each half split by rows, rank r holds [gate_r; up_r]


def tp_shard(state: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `rank` of `tp`: its slice of a full (TP = 1) Megatron state dict. The fused qkv rows are
    grouped by query group (fuse_qkv), so a contiguous row slice is num_key_value_heads / tp whole groups."""
    for name, size in (("num_key_value_heads", cfg.num_key_value_heads), ("vocab_size", cfg.vocab_size),
                       ("intermediate_size", cfg.intermediate_size)):
        if size % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide {name}={size}")
    out = {}
    for key, t in state.items():
        if key.endswith(_TP_ROWS):
            out[key] = t.chunk(tp, dim=0)[rank]
        elif key.endswith(_TP_COLS):
            out[key] = t.chunk(tp, dim=1)[rank]
        elif key.endswith(_TP_GATED):
            gate, up = t.chunk(2, dim=0)
            out[key] = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        else:
            out[key] = t
    return out


def tp_unshard(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of tp_shard over all tp ranks' slices (in rank order)."""
    out = {}
    for key, t in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith(_TP_ROWS):
            out[key] = torch.cat(parts, dim=0)
        elif key.endswith(_TP_COLS):
            out[key] = torch.cat(parts, dim=1)
        elif key.endswith(_TP_GATED):
            halves = [p.chunk(2, dim=0) for p in parts]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[key] = t
    return out


# Pipeline parallelism: stage r of PP holds layers [r L / PP, (r + 1) L / PP) under local names decoder.layers.0 ...
# (megatron.core's TransformerBlock numbers a stage's layers from 0; their layer_number carries the offset), the
# embedding on the first stage, the final norm and output layer on the last.
_LAYERS = "decoder.layers."
_FIRST = ("embedding.",)
_LAST = ("decoder.final_layernorm.", "output_layer.")


def pp_layers(cfg: ModelConfig, pp: int, rank: int) -> range:
    """The global layer indices of pipeline stage `rank` of `pp` (Megatron's even split, no uneven first/last)."""
    if cfg.num_hidden_layers % pp:
        raise ValueError(f"pipeline_model_parallel_size={pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")
    if cfg.tie_word_embeddings and pp > 1:
        raise ValueError("pipeline_model_parallel_size > 1 with tied embeddings: the last stage would hold a copy of "
                         "the embedding table, which this conversion does not write")
    n = cfg.num_hidden_layers // pp
    return range(rank * n, (rank + 1) * n)


def _layer_key(key: str) -> tuple[int, str]:
    index, rest = key[len(_LAYERS):].split(".", 1)
    return int(index), rest


def pp_shard(state: dict[str, torch.Tensor], cfg: ModelConfig, pp: int, rank: int) -> dict[str, torch.Tensor]:
    """Pipeline stage `rank` of `pp`: its slice of a Megatron state dict (full or one TP rank's), layers renamed to
    the stage's local indices."""
    layers = pp_layers(cfg, pp, rank)
    out = {}
    for key, t in state.items():
        if key.startswith(_LAYERS):
            i, rest = _layer_key(key)
            if i in layers:
                out[f"{_LAYERS}{i - layers.start}.{rest}"] = t
        elif key.startswith(_FIRST):
            if rank == 0:
                out[key] = t
        elif key.startswith(_LAST):
            if rank == pp - 1:
                out[key] = t
        else:
            raise KeyError(f"pp_shard: {key} belongs to no pipeline stage")
    return out


def pp_unshard(stages: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of pp_shard over all stages' slices (in stage order)."""
    out = {}
    for rank, state in enumerate(stages):
        start = pp_layers(cfg, len(stages), rank).start
        for key, t in state.items():
            if key.startswith(_LAYERS):
                i, rest = _layer_key(key)
                key = f"{_LAYERS}{i + start}.{rest}"
            if key in out:
                raise KeyError(f"pp_unshard: {key} is held by two pipeline stages")
            out[key] = t
    return out
