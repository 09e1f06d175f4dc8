"""Text of a SentencePiece-style tokenizer (Llama 2, Mistral: "▁" spaces stripped at the start of a decode, byte
fallback tokens <0xNN>): an output is decoded after the prompt's last tokens, as SGLang (Req.init_incremental_detokenize,
5 tokens) and vLLM (a DecodeStream primed with the prompt) decode it, so its first word keeps its space; and a byte
run that turns invalid (a byte-fallback decode then replaces bytes it had shown) neither fails the request nor
repeats text in the stream."""

from __future__ import annotations

import json

import pytest
from engine_support import make_engine
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaTokenizerFast

from hotswap.scheduler.detokenizer import detokenizer_for
from hotswap.testing.tiny_models import build_tiny_checkpoint

WORDS = ["▁Hello", "▁world", "▁", "a", "b"]


@pytest.fixture(scope="module")
def sp_llama(tmp_path_factory: pytest.TempPathFactory):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("sp_llama"), "llama", vocab_size=len(hf), init_std=0.02)
    for f in path.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    hf.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    return path


def test_the_first_word_keeps_its_space(sp_llama):
    tok = AutoTokenizer.from_pretrained(sp_llama)
    hello = tok.convert_tokens_to_ids("▁Hello")
    prompt = [1, tok.convert_tokens_to_ids("▁world")]
    sp = {"max_new_tokens": 2, "temperature": 0, "logit_bias": {str(hello): 100.0}}
    with make_engine(sp_llama) as engine:
        assert engine.generate(input_ids=prompt, sampling_params=sp)["text"] == " Hello Hello"
        chunks = list(engine.generate(input_ids=prompt, sampling_params=sp, stream=True, incremental_streaming_output=True))
        assert "".join(c["text"] for c in chunks) == " Hello Hello"
        out = engine.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 3, "stop": ["lo H"]})
        assert out["text"] == " Hel" and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "lo H"}
        # a prompt ending mid-character gives no context: the output is decoded alone
        assert engine.generate(input_ids=[1, tok.convert_tokens_to_ids("<0xE4>")], sampling_params=sp)["text"] == "Hello Hello"


def test_a_byte_run_turning_invalid_neither_fails_nor_repeats(sp_llama):
    tok = AutoTokenizer.from_pretrained(sp_llama)
    lt, fb, a = (tok.convert_tokens_to_ids(t) for t in ("<0x3C>", "<0xFB>", "a"))
    ids = [lt, fb, a, a]  # "<" is shown, then <0xFB> makes the run [3C FB] invalid: "<" decodes as U+FFFD from then on
    for skip in (True, False):
        det = detokenizer_for(tok, skip, [1, a])
        pieces = [det.step(ids[: k + 1]) for k in range(len(ids))]  # the DecodeStream refuses "a": the window takes over
        assert pieces == ["<", "", "\ufffda", "a"]
    bias = {str(t): 50.0 for t in (lt, fb, a)}
    with make_engine(sp_llama) as engine:
        for seed in range(12):
            sp = {"max_new_tokens": 8, "temperature": 1.0, "seed": seed, "logit_bias": bias}
            for stop in ([], ["zz"]):
                out = engine.generate(input_ids=[1, a], sampling_params={**sp, "stop": stop})
                assert out["meta_info"]["finish_reason"]["type"] == "length", out
                for incremental in (True, False):
                    chunks = list(engine.generate(input_ids=[1, a], sampling_params={**sp, "stop": stop}, stream=True,
                                                  incremental_streaming_output=incremental))
                    texts = [c["text"] for c in chunks]
                    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
                    if not incremental:  # each chunk extends the one before
                        assert all(b.startswith(t) for t, b in zip(texts, texts[1:]))
                    # each token is one character ("<", "a" or U+FFFD for an invalid byte): none lost or repeated
                    assert len("".join(texts) if incremental else texts[-1]) == len(out["text"]) == 8
