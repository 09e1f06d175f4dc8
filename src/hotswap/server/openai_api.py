"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions. Their requests are
openai_requests.py's, their replies openai_replies.py's, a chat's message parsing openai_chat.py's."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from hotswap.errors import shown
from hotswap.server.chat_parsers import chat_template_kwargs
from hotswap.server.generation import await_generation, open_stream
from hotswap.server.http_utils import APIError, JSONResponse, parse_body
from hotswap.server.openai_chat import ChatParsing, ChoiceStream
from hotswap.server.openai_replies import (
    chat_logprobs,
    choice_meta_info,
    completion_logprobs,
    finish_reason,
    matched_stop,
    reply_id,
    reply_metadata,
    reply_usage,
    routed,
    sglext,
    stream_response,
    stream_usage,
    vllm_prompt_logprobs,
)
from hotswap.server.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    check_prompt,
    refuse_request_chat_template,
    sampling_dict,
)

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


async def _generate_all(state: ServerState, request: Request, id_lists: list[list[int]], sp: dict, return_logprob: bool,
                        top_logprobs_num: int, logprob_start_len: int | None = None, rid: str | list[str] | None = None) -> list[dict]:
    coro = state.engine.async_generate(input_ids=id_lists, sampling_params=sp, return_logprob=return_logprob,
                                       top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len, rid=rid)
    outs = await await_generation(request, coro)
    return outs if isinstance(outs, list) else [outs]


def register(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [state.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        # the listing names one model (requests may name any: frameworks send their own names, as to SGLang)
        if model_id not in (state.served_model_name, state.model_path):
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{state.served_model_name}`.",
                           type_="NotFoundError", param="model", code="model_not_found")
        return JSONResponse(state.model_card())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        state.check_serving()
        state.require_tokenizer("/v1/completions")
        if body.suffix:
            raise APIError(400, "suffix is not supported by hotswap", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported by hotswap (only best_of == n)", param="best_of")
        prompt = body.prompt
        special = body.add_special_tokens
        if isinstance(prompt, str):  # tokenization never stalls the event loop
            id_lists = [await asyncio.to_thread(state.engine.encode, prompt, special)]
        elif not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        elif isinstance(prompt[0], str):
            id_lists = await asyncio.to_thread(lambda: [state.engine.encode(x, special) for x in prompt])
        elif isinstance(prompt[0], int):
            id_lists = [list(prompt)]
        else:
            id_lists = [list(x) for x in prompt]
        for i, ids in enumerate(id_lists):
            check_prompt(state, ids, body.max_tokens, i)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        sp = sampling_dict(body, max_tokens)
        want_lp = body.logprobs is not None
        k = body.logprobs or 0
        as_ids = body.return_tokens_as_token_ids
        echo_lp = body.echo and want_lp  # OpenAI prepends the prompt tokens' logprobs
        score_prompt = echo_lp or body.prompt_logprobs is not None
        lp_args = {"return_logprob": want_lp or score_prompt, "top_logprobs_num": max(k, body.prompt_logprobs or 0),
                   "logprob_start_len": 0 if score_prompt else None}

        async def echoed() -> list[str] | None:
            """The prompts' text for `echo`, decoded once the engine has accepted their ids (never out-of-vocabulary ones)."""
            return await asyncio.to_thread(lambda: [state.decode(ids) for ids in id_lists]) if body.echo else None

        n = body.n
        rid = reply_id(body.rid, len(id_lists), "cmpl")
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in id_lists)
        # one prompt goes as one (the engine then keeps a string rid as it is, as SGLang does)
        prompts = id_lists[0] if len(id_lists) == 1 else id_lists

        if not body.stream:
            outs = await _generate_all(state, request, prompts, sp, rid=body.rid, **lp_args)
            state.metrics.observe_generation("/v1/completions", outs)
            echo_texts = await echoed()
            choices = []
            for i, out in enumerate(outs):
                meta = out["meta_info"]
                text = out["text"]
                if echo_texts is not None:
                    text = echo_texts[i // n] + text
                lp = completion_logprobs(state, meta, 0, len(out["output_ids"]), k, 0, as_ids, echo=echo_lp) if want_lp else None
                c = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta),
                     **routed(meta)}
                if body.prompt_logprobs is not None:
                    c["prompt_logprobs"] = vllm_prompt_logprobs(state, meta, body.prompt_logprobs)
                if body.return_token_ids:
                    c.update(prompt_token_ids=id_lists[i // n], token_ids=list(out["output_ids"]))
                if body.return_meta_info:
                    c["meta_info"] = choice_meta_info(out)
                choices.append(c)
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.served_model_name,
                                 "system_fingerprint": state.fingerprint(outs), "choices": choices,
                                 "usage": reply_usage(prompt_tokens, outs, n), "metadata": reply_metadata(outs), **sglext(outs)})

        chunks = await open_stream(state.engine, input_ids=prompts, sampling_params=sp, incremental_streaming_output=False, rid=body.rid,
                                   **lp_args)
        echo_texts = await echoed()
        offsets: dict[int, int] = {}

        def choice(i: int, text: str, meta: dict, start: int, end: int, fin: str | None) -> dict:
            lp = None
            if want_lp:  # the prompt's logprobs ride on each choice's first chunk
                lp = completion_logprobs(state, meta, start, end, k, offsets.get(i, 0), as_ids, echo=echo_lp and start == 0)
                offsets[i] = offsets.get(i, 0) + sum(len(t) for t in lp["tokens"])
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": fin}
            if body.prompt_logprobs is not None and start == 0:
                c["prompt_logprobs"] = vllm_prompt_logprobs(state, meta, body.prompt_logprobs)
            if body.return_token_ids and start == 0:  # vLLM: the prompt's ids come with a choice's first chunk
                c["prompt_token_ids"] = id_lists[i // n]
            return c

        opening = [{"index": i, "text": echo_texts[i // n], "logprobs": None, "finish_reason": None, "matched_stop": None}
                   for i in range(len(id_lists) * n)] if echo_texts is not None else []
        return stream_response(state, "/v1/completions", chunks, rid=rid, object_name="text_completion", created=created,
                                usage=stream_usage(body), n=n, prompt_tokens=prompt_tokens, opening=opening, choice=choice,
                                token_ids=bool(body.return_token_ids), meta_info=body.return_meta_info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        state.check_serving()
        state.require_tokenizer("/v1/chat/completions")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {shown(body.response_format.get('type'))} is not supported by hotswap", param="response_format")
        if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
            raise APIError(400, "forcing tool calls is not supported by hotswap", param="tool_choice")
        if body.tool_choice not in (None, "none", "auto"):  # vLLM's and SGLang's request models refuse any other value
            raise APIError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {shown(body.tool_choice)}",
                           param="tool_choice")
        refuse_request_chat_template(body.chat_template)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if body.input_ids is not None:  # the caller's prompt as it is; the messages are not rendered
            ids = list(body.input_ids)
        else:  # the chat template runs in a worker thread, never on the event loop
            ids = await asyncio.to_thread(state.render_chat, body.messages, tools=body.tools if body.tool_choice != "none" else None,
                                          add_generation_prompt=body.add_generation_prompt,
                                          continue_final_message=body.continue_final_message,
                                          kwargs=chat_template_kwargs(state.reasoning_parser, body.chat_template_kwargs),
                                          add_special_tokens=body.add_special_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_prompt(state, ids, max_tokens, 0, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
                     "input_ids" if body.input_ids is not None else "messages")
        if max_tokens is None:
            max_tokens = max(1, state.max_context_len - len(ids))
        # the model's generation_config.json values for what the request leaves unset, as SGLang's chat takes them
        sp = sampling_dict(body, max_tokens, state.engine.model_config.sampling_defaults)
        if body.tools and body.tool_choice != "none":
            # SGLang (serving_chat.py, OpenAIServingChat._process_messages) keeps special tokens in the text of a request
            # that offers tools: many models mark a call with special tokens (Llama 3's <|python_tag|>, Mistral's
            # [TOOL_CALLS], DeepSeek's and Kimi's tool-call tokens), and a client parsing the call from the text needs them
            sp["skip_special_tokens"] = False
        want_lp = body.logprobs
        k = body.top_logprobs or 0
        as_ids = body.return_tokens_as_token_ids
        n = body.n
        if isinstance(body.rid, list):
            raise APIError(400, "rid must be a string for a chat completion (one prompt)", param="rid")
        rid = reply_id(body.rid, 1, "chatcmpl")
        created = int(time.time())
        prompt_tokens = len(ids)
        parsing = ChatParsing(state, body)

        if not body.stream:
            outs = await _generate_all(state, request, ids, sp, want_lp, k, rid=body.rid)
            state.metrics.observe_generation("/v1/chat/completions", outs)
            choices = []
            for i, out in enumerate(outs):
                meta = out["meta_info"]
                text = out["text"]
                lp = chat_logprobs(state, meta, 0, len(out["output_ids"]), k, as_ids) if want_lp else None
                message, fin, matched = parsing.message(text, meta)
                c = {"index": i, "message": message, "logprobs": lp, "finish_reason": fin, "matched_stop": matched, **routed(meta)}
                if body.return_token_ids:
                    c["token_ids"] = list(out["output_ids"])
                if body.return_token_ids or body.return_prompt_token_ids:  # SGLang serving_chat.py: on the choice
                    c["prompt_token_ids"] = ids
                if body.return_meta_info:
                    c["meta_info"] = choice_meta_info(out)
                choices.append(c)
            reply = {"id": rid, "object": "chat.completion", "created": created, "model": state.served_model_name,
                     "system_fingerprint": state.fingerprint(outs), "choices": choices, "usage": reply_usage(prompt_tokens, outs, n),
                     "metadata": reply_metadata(outs), **sglext(outs)}
            if body.return_token_ids:
                reply["prompt_token_ids"] = ids
            return JSONResponse(reply)

        chunks = await open_stream(state.engine, input_ids=ids, sampling_params=sp, return_logprob=want_lp, top_logprobs_num=k,
                                   incremental_streaming_output=False, rid=body.rid)

        streams: dict[int, ChoiceStream] = {}

        def choice(i: int, text: str, meta: dict, start: int, end: int, fin: str | None) -> dict:
            lp = chat_logprobs(state, meta, start, end, k, as_ids) if want_lp else None
            delta, fin = streams.setdefault(i, parsing.stream()).delta(text, fin)
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None, "matched_stop": None,
                    **({"prompt_token_ids": ids} if body.return_token_ids or body.return_prompt_token_ids else {})} for i in range(n)]
        return stream_response(state, "/v1/chat/completions", chunks, rid=rid, object_name="chat.completion.chunk", created=created,
                                usage=stream_usage(body), n=n, prompt_tokens=prompt_tokens, opening=opening, choice=choice,
                                token_ids=bool(body.return_token_ids), meta_info=body.return_meta_info,
                                opening_extra={"prompt_token_ids": ids} if body.return_token_ids else None)
