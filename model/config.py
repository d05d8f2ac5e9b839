"""The Nanbeige decoder's shape: one frozen dataclass, read from params.yaml and written as a Hugging Face config.json.

The `3b` profile is Nanbeige4-3B (RECIPE.md): 32 layers, hidden 2560, SwiGLU FFN 10496, 20 query heads,
4 KV heads (GQA), head dim 128, vocab 166,144, RMSNorm eps 1e-5, no biases, untied embeddings, RoPE theta 5e6.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass



class ModelError(ValueError):
    """A model config or checkpoint refused, with a message naming the file or key at fault (model/ imports nothing
    from stages/, so stages that use the model catch this next to their own StageError)."""


# Keys stage_params() adds to every slice, and `kernels` (the ops backend, applied by model.ops.set_kernels):
# not part of the architecture.
_SLICE_KEYS = ("seed", "scale", "kernels")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "initializer_range")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads}) for GQA")
        if self.head_dim % 2:
            raise ModelError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ModelError(f"model config: rope_theta and rms_norm_eps must be > 0, "
                             f"got {self.rope_theta!r}, {self.rms_norm_eps!r}")

    # ------------------------------------------------------------------------- params.yaml

    @classmethod
    def from_params(cls, d: dict) -> ModelConfig:
        """From the `model` slice of params.yaml (common.stage_params(params, "model")); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in d.items() if k not in _SLICE_KEYS}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ModelError(f"params model: unknown keys {unknown} (known: {sorted(fields)})")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in given)
        if missing:
            raise ModelError(f"params model: missing keys {missing}")
        # YAML reads `5e6` (no dot) as a string; the float knobs accept it.
        for name in _FLOAT_FIELDS:
            if name in given:
                try:
                    given[name] = float(given[name])
                except (TypeError, ValueError):
                    raise ModelError(f"params model: {name} must be a number, got {given[name]!r}") from None
        return cls(**given)

    # ------------------------------------------------------------------------- Hugging Face config.json

    def to_hf_config(self, dtype: str = "float32") -> dict:
        """A `LlamaConfig`-compatible config.json dict; `dtype` names the stored weights' dtype ("bfloat16", ...)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            # transformers < 5 and most serving engines read `rope_theta`; transformers >= 5 reads `rope_parameters`.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            # transformers < 5 reads `torch_dtype`, >= 5 reads `dtype`.
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    @classmethod
    def from_hf_config(cls, d: dict) -> ModelConfig:
        """From a Llama config.json; refuses the Llama variants this decoder does not implement."""
        if d.get("model_type", "llama") != "llama":
            raise ModelError(f"config.json: model_type {d.get('model_type')!r} is not 'llama'")
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, want) != want:
                raise ModelError(f"config.json: {key}={d[key]!r} is not supported (need {want!r})")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelError(f"config.json: rope_type {rope_type!r} is not supported (only plain RoPE with ABF)")
        rope_theta = rope.get("rope_theta", d.get("rope_theta"))
        if rope_theta is None:
            raise ModelError("config.json: no rope_theta (neither top level nor in rope_parameters)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d["max_position_embeddings"],
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=_single_token_id(d, "bos_token_id"),
            eos_token_id=_single_token_id(d, "eos_token_id"),
            pad_token_id=_single_token_id(d, "pad_token_id"),
        )

    # ------------------------------------------------------------------------- derived

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Analytic count, no allocation. Per layer: q,o = hidden*heads*head_dim each, k,v = hidden*kv_heads*head_dim
        each, SwiGLU = 3*hidden*ffn, two RMSNorm weights; plus the final norm; embeddings are embed_tokens and
        (untied) lm_head, vocab*hidden each."""
        h, d = self.hidden_size, self.head_dim
        attention = 2 * h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d
        mlp = 3 * h * self.intermediate_size
        body = self.num_hidden_layers * (attention + mlp + 2 * h) + h
        if not include_embeddings:
            return body
        return body + self.vocab_size * h * (1 if self.tie_word_embeddings else 2)

    def with_rope_theta(self, theta: float, max_position_embeddings: int | None = None) -> ModelConfig:
        """Adjusted Base Frequency (ABF): the same weights with a larger RoPE base, optionally a longer context."""
        return dataclasses.replace(self, rope_theta=float(theta),
                                   max_position_embeddings=max_position_embeddings or self.max_position_embeddings)


def _single_token_id(d: dict, key: str) -> int | None:
    value = d.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise ModelError(f"config.json: {key}={value!r}: only a single token id is supported")
        value = value[0]
    return value
