"""SGLang's generate-request fields hotswap does not serve, and their one refusal. Engine.generate's arguments and
/generate's body are the same fields (SGLang's GenerateReqInput, managers/io_struct.py); the OpenAI routes take them
too, beside their own. Sent unset (None, false, empty: what frameworks send by default) they pass; set, they are
refused by name, never silently ignored (an ignored token_ids_logprob or session_params would hand back a reply
missing what was asked). Taken and not used (not here): `external_trace_header` (tracing), `priority` (SGLang ignores
it without priority scheduling), `cache_salt` (the prefix cache's sharing never changes an output), `kv_router_hint`
(a router's hint; one engine here), `session_id` (a stable id of a session's requests that, unlike `session_params`,
changes nothing of the prompt: io_struct.py's own comment)."""

from __future__ import annotations

from hotswap.errors import UnservedFieldError, shown

# GenerateReqInput's fields hotswap does not serve -> what each asks for
UNSERVED_GENERATE_FIELDS = {
    "image_data": "image input", "audio_data": "audio input", "video_data": "video input", "mm_hashes": "multimodal input",
    "mm_content_hashes": "multimodal input", "lora_path": "LoRA adapters", "custom_logit_processor": "custom logit processors",
    "token_ids_logprob": "logprobs of chosen token ids", "return_hidden_states": "hidden states",
    "return_sampling_mask": "sampling masks", "return_flat_raw_top_logprobs": "flat top-logprob arrays",
    "return_flat_raw_top_logprobs_b64": "flat top-logprob arrays", "return_indexer_topk": "indexer top-k",
    "return_entropy": "entropy", "return_prompt_token_ids": "prompt token ids in the reply", "return_bytes": "image bytes",
    "input_embeds": "input embeddings", "positional_embed_overrides": "input embeddings",
    "session_params": "continual-prompting sessions",
    "bootstrap_host": "PD disaggregation", "bootstrap_port": "PD disaggregation", "bootstrap_room": "PD disaggregation",
    "bootstrap_pair_key": "PD disaggregation", "decode_tp_size": "PD disaggregation",
    "max_thinking_tokens": "thinking budgets", "require_reasoning": "reasoning control",
    "multi_item_delimiter_indices": "multi-item scoring",
}
# GenerateReqInput's multimodal fields SGLang's OpenAI requests do not have (entrypoints/openai/protocol.py: a chat's images
# come inside its messages): unknown keys there, ignored as SGLang ignores them
_NOT_OPENAI_FIELDS = ("image_data", "mm_hashes", "mm_content_hashes")
# the rest on the OpenAI routes, and the request fields there that change what is sampled or returned: SGLang's
# stop_regex, vLLM's (a chat's echo and prompt_logprobs: /v1/completions serves both)
UNSERVED_OPENAI_FIELDS = {**{k: v for k, v in UNSERVED_GENERATE_FIELDS.items() if k not in _NOT_OPENAI_FIELDS},
                          "stop_regex": "regex stop conditions",
                          "allowed_token_ids": "sampling restricted to given token ids", "bad_words": "banned words",
                          "truncate_prompt_tokens": "prompt truncation", "echo": "the prompt echoed in a chat reply",
                          "prompt_logprobs": "prompt logprobs in a chat reply"}
# data-parallel rank hints: one DP rank here, so 0 (or unset) is the only rank there is
DP_RANK_FIELDS = ("data_parallel_rank", "routed_dp_rank", "disagg_prefill_dp_rank")


def is_unset(value: object) -> bool:
    """An SGLang field a framework sends without asking for anything: None, False, "", {}, or a list of those
    (one per prompt of a batch, e.g. image_data=[None, None])."""
    if isinstance(value, (list, tuple)):
        return all(is_unset(v) for v in value)
    return value is None or value is False or value == "" or value == {}


def refuse_unserved_fields(fields: dict[str, object], unserved: dict[str, str] = UNSERVED_GENERATE_FIELDS) -> None:
    """Raise UnservedFieldError naming the first field of `unserved` that is set, or a data-parallel rank other
    than 0; other fields pass (`fields` may hold any others: a request's extras, or generate's arguments)."""
    for key, value in fields.items():
        if key in unserved and not is_unset(value):
            raise UnservedFieldError(key, f"{key!r} ({unserved[key]}) is not supported by hotswap; leave it unset")
        if key in DP_RANK_FIELDS and value not in (None, 0):
            raise UnservedFieldError(key, f"{key}={shown(value)} out of range [0, 1): hotswap serves one data-parallel rank")
