"""The Nanbeige (Llama-style) decoder: config per scale, the model, Hugging Face-layout checkpoints."""
from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig
from model.llama import KVCache, NanbeigeForCausalLM

__all__ = ["KVCache", "ModelConfig", "NanbeigeForCausalLM", "load_pretrained", "save_pretrained"]
