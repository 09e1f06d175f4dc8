"""SGLang's skip_tokenizer_init (TokenizerManager.init_tokenizer_and_processor, Scheduler and DetokenizerManager):
no tokenizer is loaded at all, so a checkpoint folder without tokenizer files serves; requests give input_ids
(a text prompt is refused with SGLang's message, _tokenize_one_request), stop strings are refused
(sampling_params.py::raise_if_tokenizer_required), eos comes from config.json and generation_config.json
(ModelConfig._get_hf_eos_token_id), and a /generate reply is {output_ids, meta_info} with no text key
(TokenizerManager._handle_batch_output on a BatchTokenIDOutput)."""

import json
import shutil

import httpx
import pytest

from hotswap import Engine
from hotswap.errors import HotswapError
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def bare_checkpoint(tiny_qwen3, tmp_path_factory):
    """tiny_qwen3's weights and config without a single tokenizer file."""
    folder = tmp_path_factory.mktemp("no_tokenizer") / "model"
    shutil.copytree(tiny_qwen3, folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            f.unlink()
    return folder


@pytest.fixture(scope="module")
def engine(bare_checkpoint):
    with Engine(str(bare_checkpoint), device="cpu", page_size=4, skip_tokenizer_init=True) as eng:
        yield eng


@pytest.fixture(scope="module")
def c(engine):
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def test_no_tokenizer_loads_and_a_folder_without_one_serves_ids(engine, tiny_qwen3):
    assert engine.tokenizer is None
    out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert "text" not in out and len(out["output_ids"]) == 3 and out["meta_info"]["completion_tokens"] == 3
    assert out["meta_info"]["prompt_tokens"] == len(PROMPT)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as ref:  # the same weights, with their tokenizer
        same = ref.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert same["output_ids"] == out["output_ids"]


def test_text_prompts_and_stop_strings_are_refused_with_sglangs_words(engine):
    with pytest.raises(HotswapError, match="skip_tokenizer_init=True cannot accept text prompts"):
        engine.generate("Alice likes", {"max_new_tokens": 2})
    with pytest.raises(HotswapError, match=r"stop=\['x'\] is unavailable when skip_tokenizer_init=True"):
        engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2, "stop": "x"})


def test_eos_is_the_models_own(engine, bare_checkpoint):
    config = json.loads((bare_checkpoint / "config.json").read_text())
    eos = config["eos_token_id"]
    eos = {eos} if isinstance(eos, int) else set(eos)
    assert engine.eos_token_ids == sorted(eos)
    first = min(eos)  # pushed to the top: the first token sampled ends the request on the model's eos, no tokenizer needed
    out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0, "logit_bias": {str(first): 100.0}})
    assert out["output_ids"] == [first] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}


def test_generate_route_replies_ids_only_and_refuses_text(c):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "return_text_in_logprobs": True}
    r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"output_ids", "meta_info"} and len(out["output_ids"]) == 2
    assert [t[2] for t in out["meta_info"]["output_token_logprobs"]] == [None, None]  # no text in the entries either
    with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks and all("text" not in ch for ch in chunks) and chunks[-1]["output_ids"] == out["output_ids"]
    r = c.post("/generate", json={"text": "Alice likes", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400 and "cannot accept text prompts" in r.text
    r = c.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "stop": ["x"]}})
    assert r.status_code == 400 and "skip_tokenizer_init" in r.text


def test_text_routes_refuse_by_name_and_info_reads_back(c, bare_checkpoint):
    for route, body in (("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}),
                        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
                        ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        r = c.post(route, json=body)
        assert r.status_code == 400 and "skip_tokenizer_init" in r.text, (route, r.text)
    assert c.get("/get_server_info").json()["skip_tokenizer_init"] is True
    # SGLang reports ServerArgs.tokenizer_path, which defaults to the model path whether or not it is loaded
    assert c.get("/get_model_info").json()["tokenizer_path"] == str(bare_checkpoint)


def test_streamed_chunks_keep_their_token_deltas_without_text(engine):
    """A streamed chunk drops only the text keys: its new ids (delta_output_ids) still add up to the whole output."""
    greedy = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    whole = engine.generate(input_ids=PROMPT, sampling_params=greedy)["output_ids"]
    chunks = list(engine.generate(input_ids=PROMPT, sampling_params=greedy, stream=True))
    assert chunks and all("text" not in ch and "delta_text" not in ch for ch in chunks)
    assert [t for ch in chunks for t in ch["delta_output_ids"]] == whole
