"""The Nanbeige (Llama-style) decoder: config per scale, the model, Hugging Face-layout checkpoints, the generation
engine (`generate`: ragged batches, top-p, stop strings, per-sample seeds, sampled-token log-probs)."""
from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig
from model.generate import Completion, Request, SamplingParams, generate
from model.llama import KVCache, NanbeigeForCausalLM

__all__ = ["Completion", "KVCache", "ModelConfig", "NanbeigeForCausalLM", "Request", "SamplingParams", "generate",
           "load_pretrained", "save_pretrained"]
