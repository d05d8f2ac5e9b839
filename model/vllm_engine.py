"""The vLLM backend of the generation engine: model.generate's contract on vLLM, for rollouts at 3b scale.

    engine = VLLMEngine(checkpoint_dir)                  # an HF Llama-layout checkpoint (model.checkpoint)
    engine.generate([Request(prompt_ids, seeds), ...], SamplingParams(...), decode) -> list[list[Completion]]
    engine.sync_weights(trainer_model)                   # the trainer's current weights, into vLLM in place

vllm is an optional GPU dependency (requirements-gpu.txt), imported only when an engine is built.

Requests. One vLLM request per (prompt, seed): TokensPrompt(prompt_token_ids) with vllm.SamplingParams(n=1,
seed=seed, max_tokens=min(max_new_tokens, context - prompt length), temperature, top_p, top_k=0, stop_token_ids,
stop=stop_strings, ignore_eos=True, logprobs=0). ignore_eos: only our stop ids and strings end a sample (vLLM would
also stop at the tokenizer's and generation_config's EOS). logprobs=0 returns the sampled token's log-prob alone
(CompletionOutput.logprobs[t] = {token_ids[t]: Logprob}). Outputs come back in input order (LLM.generate) and are
regrouped per request, one Completion per seed. finish_reason "length" stays "length"; "stop" keeps vLLM's
stop_reason (the stop token id or the stop string) as Completion.stop; token_ids keep the stop token and the token
completing a stop string, as ours. text is ours too: decode(token_ids) cut as model.generate cuts it (vLLM only
detokenizes to find stop strings, with the checkpoint's own tokenizer: decode must be that tokenizer).

Log-probs. vLLM returns one kind per engine (EngineArgs logprobs_mode; vllm/v1/sample/sampler.py):
  raw_logprobs        log_softmax of the model's fp32 logits before any processing = our Completion.logprobs
                      (temperature 1, whole vocabulary)
  processed_logprobs  log_softmax after temperature and top-k/top-p masking = our Completion.sampling_logprobs
RL's old log-probs are Completion.logprobs (stages/rl.py; the trainer's new ones are token_logprobs at temperature
1), so the default is raw_logprobs. The other field is filled where the two coincide, and is NaN elsewhere (loud,
never silently wrong): greedy (sampling_logprobs 0.0, a point mass, as ours; vLLM's greedy log-prob is the raw one in
either mode) and temperature 1 with top_p 1 (no processing: raw == processed, RL's defaults).

Weight sync (colocated: the trainer and vLLM share the process and the GPU). After each optimizer step and before the
next rollout the trainer calls sync_weights(model): every tensor of model.state_dict() by its HF name (lm_head left
out when tied, as save_pretrained does) goes through vLLM's LLM.apply_model into the worker model's own load_weights,
which maps the HF names onto its fused layout (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj) and copies in
place (CUDA graphs stay valid); then the prefix cache is reset, since its KV blocks were computed by the old weights
(TRL's colocated GRPO does the same: load_weights per parameter, then reset_prefix_cache). The engine runs vLLM's
engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tensors are handed over, never serialized.
Under FSDP2 each parameter is a DTensor shard: it is all-gathered (full_tensor) one parameter at a time, just before
vLLM copies it, so one full parameter at a time is held beyond the shards; every rank gathers (a collective, same
order) and loads its own vLLM engine (TP 1). gpu_memory_utilization is the share of GPU memory vLLM takes for weights
and KV cache, the rest is the trainer's.

Determinism. vLLM's per-request seeds make a sample reproducible only on the same GPU, vLLM version and batching:
its logits change with the batch's composition (non batch-invariant kernels, prefix-cache hits) and a near-tie draw
can flip. A resumed run is guaranteed the same samples only on our engine (model.generate); with vLLM it gets
samples from the same distribution, not the same samples.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from model.checkpoint import CONFIG
from model.config import ModelConfig
from model.generation import Completion, Request, SamplingParams, _text

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
# vLLM clamps 0 < T < 0.01 up to 0.01 and refuses T > 2 (vllm/sampling_params.py): outside that, it would not
# sample the distribution asked for.
TEMPERATURE_RANGE = (0.01, 2.0)


def import_vllm():
    """The vllm module, or an ImportError saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"model.vllm_engine needs vllm, an optional GPU dependency ({exc}): on a CUDA machine, "
                          "pip install -r requirements-gpu.txt; without it, use model.generate") from None
    return vllm


class VLLMEngine:
    """model.generate's contract on a vLLM engine built from an HF Llama-layout checkpoint directory (config.json +
    model.safetensors; tokenizer.json when there is one, else vLLM runs without a tokenizer and refuses stop
    strings). engine_kwargs go to vllm.LLM (e.g. enforce_eager, max_num_seqs)."""

    def __init__(self, checkpoint: str | os.PathLike, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 logprobs_mode: str = "raw_logprobs", seed: int = 0, **engine_kwargs):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"VLLMEngine: logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        path = Path(checkpoint)
        self.config = ModelConfig.from_hf_config(json.loads((path / CONFIG).read_text(encoding="utf-8")))
        self.logprobs_mode = logprobs_mode
        self.has_tokenizer = (path / "tokenizer.json").is_file()
        # The engine core in this process: sync_weights hands tensors to the worker's model directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.vllm = import_vllm()
        self.llm = self.vllm.LLM(model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                 logprobs_mode=logprobs_mode, seed=seed, skip_tokenizer_init=not self.has_tokenizer,
                                 max_model_len=self.config.max_position_embeddings, **engine_kwargs)

    def generate(self, requests: Sequence[Request], params: SamplingParams,
                 decode: Callable[[list[int]], str] | None = None) -> list[list[Completion]]:
        """result[r][i] is the sample of requests[r] drawn with seed requests[r].seeds[i] (model.generate's
        contract; see the module docstring for what vLLM's samples share with ours and what they do not)."""
        context = self.config.max_position_embeddings
        if params.stop_strings and decode is None:
            raise ValueError("generate: stop strings need a decode function")
        if params.stop_strings and not self.has_tokenizer:
            raise ValueError("VLLMEngine: stop strings need the checkpoint's tokenizer.json (vLLM matches them)")
        if params.temperature and not TEMPERATURE_RANGE[0] <= params.temperature <= TEMPERATURE_RANGE[1]:
            raise ValueError(f"VLLMEngine: temperature must be 0 or in {list(TEMPERATURE_RANGE)} on vLLM, "
                             f"got {params.temperature}")
        for i, req in enumerate(requests):
            if not 0 < len(req.prompt_ids) < context or not req.seeds:
                raise ValueError(f"generate: request {i} needs 1 to {context - 1} prompt tokens and a seed, got "
                                 f"{len(req.prompt_ids)} tokens and {len(req.seeds)} seeds")
        from vllm.inputs import TokensPrompt
        prompts, sampling = [], []
        for req in requests:
            prompt = [int(t) for t in req.prompt_ids]
            for seed in req.seeds:
                prompts.append(TokensPrompt(prompt_token_ids=prompt))
                sampling.append(self._sampling_params(params, int(seed), context - len(prompt)))
        outputs = iter(self.llm.generate(prompts, sampling, use_tqdm=False))
        return [[self._completion(next(outputs), params, decode) for _ in req.seeds] for req in requests]

    def _sampling_params(self, params: SamplingParams, seed: int, room: int):
        return self.vllm.SamplingParams(
            n=1, seed=seed, max_tokens=min(params.max_new_tokens, room), temperature=params.temperature,
            top_p=params.top_p, top_k=0, stop_token_ids=list(params.stop_token_ids), stop=list(params.stop_strings),
            ignore_eos=True, logprobs=0, detokenize=bool(params.stop_strings), skip_special_tokens=False,
            spaces_between_special_tokens=False)

    def _completion(self, output, params: SamplingParams, decode: Callable[[list[int]], str] | None) -> Completion:
        out = output.outputs[0]
        tokens = [int(t) for t in out.token_ids]
        got = [float(step[t].logprob) for step, t in zip(out.logprobs, tokens)]
        if out.finish_reason == "length":
            finish = ("length", None)
        elif out.finish_reason == "stop" and out.stop_reason is not None:
            finish = ("stop", out.stop_reason)
        else:
            raise RuntimeError(f"VLLMEngine: request {output.request_id} ended with finish_reason "
                               f"{out.finish_reason!r}, stop_reason {out.stop_reason!r}")
        nan = [math.nan] * len(tokens)
        if params.temperature == 0:
            raw, sampled = got, [0.0] * len(tokens)
        elif params.temperature == 1 and params.top_p == 1:
            raw, sampled = got, got
        elif self.logprobs_mode == "raw_logprobs":
            raw, sampled = got, nan
        else:
            raw, sampled = nan, got
        return Completion(tokens, raw, list(sampled), _text(decode, tokens, finish, params.stop_strings), *finish)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's current weights into vLLM in place (see the module docstring): every parameter by its
        HF name, one FSDP2 shard gathered at a time; then the prefix cache (KV of the old weights) is dropped."""
        def load(vllm_model: torch.nn.Module) -> list[str]:
            loaded = vllm_model.load_weights(hf_tensors(model))
            # The names it wrote, in vLLM's layout (vLLM's own loader checks the same): any other kept its old value.
            return [] if loaded is None else sorted({n for n, _ in vllm_model.named_parameters()} - set(loaded))

        for missing in self.llm.apply_model(load):
            if missing:
                raise RuntimeError(f"VLLMEngine.sync_weights: vLLM parameters not written: {missing[:5]}")
        self.llm.reset_prefix_cache()


def hf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor of model.state_dict(), lazily: a DTensor (FSDP2 shard) is all-gathered
    only when its turn comes; lm_head.weight is left out when tied to the embeddings. (state_dict() names are HF's
    under activation checkpointing too: torch's checkpoint wrapper strips its prefix from them.)"""
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()

