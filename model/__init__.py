"""The Nanbeige (Llama-style) decoder: config per scale, the model, Hugging Face-layout checkpoints, the generation
engine (`generate`: ragged batches, top-p, stop strings, per-sample seeds, sampled-token log-probs)."""
from model.lazy import lazy_exports

_EXPORTS = {
    "checkpoint": ["load_pretrained", "save_pretrained"],
    "config": ["ModelConfig"],
    "generation": ["Completion", "Request", "SamplingParams", "generate"],
    "llama": ["KVCache", "NanbeigeForCausalLM"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())  # loaded on first use: model/lazy.py


def _static_imports() -> None:  # never called: the submodules above, stated for stages.common.repo_imports' AST scan
    from model import checkpoint, config, generation, llama  # noqa: F401


__all__ = ["Completion", "KVCache", "ModelConfig", "NanbeigeForCausalLM", "Request", "SamplingParams", "generate",
           "load_pretrained", "save_pretrained"]
