"""`pipeline("text-generation")(inputs, cache_implementation="paged")` over many inputs runs on the engine.

A list of prompts (or chats) normally goes through padded static batches of `batch_size`. With the "paged" cache
requested, the pipeline's own preprocess (tokenizer, chat template) and postprocess run as usual, and the whole list
in between goes through one continuous-batching `hf_paged.LLM` kept on the pipeline. Generation options the engine
does not implement the same way (beam search, logits processors, streamers, ...) fall back to the pipeline's own
path, which still uses a PagedCache through the generate patch: never silently different output.
"""

from __future__ import annotations

import torch
from transformers.pipelines.text_generation import TextGenerationPipeline

from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.patches.generate import _ORIGINAL_ATTR

ENGINE_KWARGS = {
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "num_return_sequences", "eos_token_id", "pad_token_id", "cache_implementation",
    "cache_config", "prefix_length",
}
_LLM_ATTR = "_hf_paged_llm"


def _sampling_params(config, prompt_len: int, eos_ids: tuple[int, ...]):
    from hf_paged.engine.params import SamplingParams

    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    sampling = dict(temperature=0.0)
    if config.do_sample:
        sampling = dict(temperature=config.temperature if config.temperature is not None else 1.0,
                        top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0,
                        min_p=config.min_p or 0.0)
    config_eos = config.eos_token_id
    config_eos = () if config_eos is None else tuple(config_eos) if isinstance(config_eos, list) else (config_eos,)
    return SamplingParams(
        n=config.num_return_sequences or 1, max_tokens=max(1, max_new), min_tokens=config.min_new_tokens or 0,
        repetition_penalty=config.repetition_penalty or 1.0, ignore_eos=True,
        stop_token_ids=list(dict.fromkeys(config_eos or eos_ids)), skip_special_tokens=False, **sampling,
    )


def _engine_for(pipe, cache_config: dict | None):
    llm = pipe.__dict__.get(_LLM_ATTR)
    if llm is None:
        from hf_paged.engine.llm import LLM

        # NOTE: no torch.compile here: a pipeline's first call should not wait a minute or two for it (CUDA graphs
        # still replay the decode steps); hf_paged.LLM compiles by default on a GPU.
        llm = LLM(pipe.model, pipe.tokenizer, block_size=(cache_config or {}).get("block_size", DEFAULT_BLOCK_SIZE),
                  kv_cache_memory=(cache_config or {}).get("kv_cache_memory"),
                  num_blocks=(cache_config or {}).get("num_blocks"), compile_model=False)
        pipe.__dict__[_LLM_ATTR] = llm
    return llm


def _run_on_engine(pipe, inputs, preprocess_params, forward_params, postprocess_params) -> list:
    generate_kwargs = {k: v for k, v in forward_params.items() if k not in ("prefix_length", "cache_implementation")}
    config, _ = pipe.model._prepare_generation_config(None, **pipe._prepare_generate_kwargs(generate_kwargs))
    llm = _engine_for(pipe, config.cache_config)
    model_inputs = [pipe.preprocess(item, **preprocess_params) for item in inputs]
    prompts = [m["input_ids"][0].tolist() for m in model_inputs]
    params = [_sampling_params(config, len(p), llm.engine.eos_token_ids) for p in prompts]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    results = []
    for model_input, prompt, output in zip(model_inputs, prompts, outputs):
        records = []
        for completion in output.outputs:
            sequence = torch.tensor([[prompt + completion.token_ids]])  # (1, 1, L): one sequence per record
            records += pipe.postprocess(
                {"generated_sequence": sequence, "input_ids": model_input["input_ids"],
                 "prompt_text": model_input["prompt_text"]},
                **postprocess_params,
            )
        results.append(records)
    return results


def _get_iterator(original, self, inputs, num_workers, batch_size, preprocess_params, forward_params,
                  postprocess_params):
    merged = {**self._generate_kwargs, **forward_params}
    paged = merged.get("cache_implementation") == "paged"
    if paged and isinstance(inputs, (list, tuple)) and inputs and set(merged) <= ENGINE_KWARGS and (
        merged.get("num_beams") in (None, 1)
    ):
        return iter(_run_on_engine(self, list(inputs), preprocess_params, forward_params, postprocess_params))
    return original(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params)


def apply_pipeline_patch() -> None:
    current = TextGenerationPipeline.get_iterator
    if getattr(current, _ORIGINAL_ATTR, None) is not None:
        return

    def get_iterator(self, *args, **kwargs):
        return _get_iterator(current, self, *args, **kwargs)

    setattr(get_iterator, _ORIGINAL_ATTR, current)
    TextGenerationPipeline.get_iterator = get_iterator


def is_pipeline_patched() -> bool:
    return getattr(TextGenerationPipeline.get_iterator, _ORIGINAL_ATTR, None) is not None
