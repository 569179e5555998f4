"""Memory planner: its arithmetic against figures computed by hand, the fit verdicts the issue demands,
and the command line (table, exit codes, one-line errors)."""

import json

import pytest

from tinychat import cli, plan
from tinychat.ops import cpu_kernels
from tinychat.errors import TinychatError

GiB = 2**30


def shape(name):
    config, _, _, _ = plan.load_shape(name)
    return config


def items(p):
    return {i.name: i.bytes for i in p.items}


def test_llama2_7b_w4_g128_weights_by_hand():
    # Llama-2-7B: 32 layers, hidden 4096, FFN 11008, 32 heads (no GQA), vocab 32000, untied head.
    #   linear params per layer: q,k,v,o 4 x 4096 x 4096 = 67,108,864; gate,up,down 3 x 4096 x 11008
    #   = 135,266,304; together 202,375,168; x 32 layers = 6,476,005,376 params.
    #   int4 codes: 6,476,005,376 / 2 = 3,238,002,688 bytes
    #   groups of 128 inputs: 6,476,005,376 / 128 = 50,593,792, each an fp16 scale + fp16 zero (4 bytes)
    #   = 202,375,168 bytes  -> quantized linears 3,440,377,856 bytes (4.25 bits/param, PERF.md's 3.44 GB)
    #   embeddings 32000 x 4096 x 2 = 262,144,000; lm_head the same; norms (2 x 32 + 1) x 4096 x 2 = 532,480
    #   total 3,440,377,856 + 2 x 262,144,000 + 532,480 = 3,965,198,336 bytes = 3.97 GB (3.69 GiB):
    #   the "about 3.9 GB including fp16 embeddings and head".
    p = plan.make_plan(shape("llama-2-7b"), "w4a16", 128, context=4096, batch=1, device="rtx4090-24gb")
    got = items(p)
    assert got["quantized linears"] == 3_440_377_856
    assert got["embeddings (fp16)"] == 262_144_000
    assert got["lm_head (fp16)"] == 262_144_000
    assert got["norms (fp16)"] == 532_480
    assert p.weights == 3_965_198_336
    assert 3.85e9 < p.weights < 4.0e9


def test_llama2_7b_fp16_and_group_64_by_hand():
    config = shape("llama-2-7b")
    # fp16: 6,476,005,376 x 2 = 12,952,010,752 + embeddings, head, norms 524,820,480 = 13,476,831,232
    assert plan.make_plan(config, "fp16", None, device="h100-80gb").weights == 13_476_831_232
    # g64: codes 3,238,002,688 + (6,476,005,376 / 64) x 4 = 404,750,336 -> 3,642,753,024 (4.5 bits/param)
    assert items(plan.make_plan(config, "w4a16", 64, device="h100-80gb"))["quantized linears"] == 3_642_753_024


def test_llama2_7b_kv_cache_and_activations_by_hand():
    p = plan.make_plan(shape("llama-2-7b"), "w4a16", 128, context=4096, batch=1, device="rtx4090-24gb")
    got = items(p)
    # 2 (K and V) x 32 layers x 32 kv heads x 128 head_dim x 2 bytes = 524,288 bytes = 0.5 MiB per token
    assert got["KV cache (fp16)"] == 524_288 * 4096 == 2 * GiB
    # one prefill chunk of 512 tokens: hidden states 512 x 3 x 4096 x 2 = 12,582,912;
    # MLP intermediates 512 x 4 x 11008 x 2 = 45,088,768 (bigger than attention's 512 x 5 x 4096 x 2);
    # fp32 scores 32 heads x 512 x 4096 x 4 = 268,435,456; logits 32000 x 10 = 320,000;
    # fp16 copy of the fused gate_up 4096 x 22016 x 2 = 180,355,072
    assert got["hidden states"] == 12_582_912
    assert got["layer intermediates"] == 45_088_768
    assert got["attention scores (fp32)"] == 268_435_456
    assert got["logits"] == 320_000
    assert got["dequantized linear (fp16)"] == 180_355_072
    # overhead on a discrete GPU: CUDA context 0.5 GiB + 5% of everything allocated
    allocated = p.weights + p.section("kv cache") + p.section("activations")
    assert got["allocator reserve"] == int(0.05 * allocated)
    assert p.total == allocated + GiB // 2 + int(0.05 * allocated)
    assert p.fits and p.margin == 24 * GiB - p.total


def test_cpu_plan_counts_the_int4_gemvs_input_rows():
    """On the CPU a prefill chunk's input rows are copied by tinychat's int4 GEMV (cpu_kernels.c) with one
    fp32 sum per group: as bf16 pairs where it multiplies on vdpbf16ps, else as fp32; no dequantized linear
    exists there."""
    p = plan.make_plan(shape("llama-2-7b"), "w4a16", 128, context=4096, batch=2, device="cpu")
    got = items(p)
    per_input = plan.cpu_gemv_input_bytes()
    assert per_input == (2 if cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64_PROMPTS else 4)
    # widest linear input: down_proj's 11008; 2 x 512 rows x (11008 inputs + 86 group sums x 4 bytes)
    assert got["int4 GEMV input rows"] == 2 * 512 * (11008 * per_input + 86 * 4)
    assert "dequantized linear (fp16)" not in got
    fp32 = plan.activation_items(shape("llama-2-7b"), "w4a16", 4096, 2, cpu=True, group_size=128)  # 4 bytes
    assert {i.name: i.bytes for i in fp32}["int4 GEMV input rows"] == 2 * 512 * (11008 + 86) * 4


def test_kv_cache_scales_with_context_and_batch():
    config = shape("llama-2-70b")
    # GQA: 2 x 80 x 8 x 128 x 2 = 327,680 bytes per token (PERF.md: 0.31 MB)
    assert plan.kv_cache_bytes(config, 1, 1) == 327_680
    assert plan.kv_cache_bytes(config, 4096, 3) == 327_680 * 4096 * 3


def test_llama2_70b_w4_fits_orin_64gb_and_fp16_does_not():
    w4 = plan.plan_model("llama-2-70b", "w4a16", 128, context=4096, device="orin-64gb")
    assert w4.fits
    # 68.45 B linear params x 4.25 bits = 36.4 GB (PERF.md), plus 1.05 GB of fp16 embeddings and head
    assert 37.0e9 < w4.weights < 37.6e9
    # unified memory: the OS, carve-outs and the host process are charged to the same 64 GiB
    assert {"firmware carve-outs", "OS and services", "host process"} <= set(items(w4))
    fp16 = plan.plan_model("llama-2-70b", "fp16", context=4096, device="orin-64gb")
    assert not fp16.fits and fp16.weights > 137e9


def test_tied_lm_head_is_counted_once_and_group_size_falls_back():
    p = plan.plan_model("SmolLM2-135M-Instruct", context=2048, device="rtx4090-24gb")
    got = items(p)
    assert got["lm_head (fp16)"] == 0
    assert got["embeddings (fp16)"] == 49152 * 576 * 2
    assert p.group_size == 64  # 576 is not a multiple of 128
    assert any("128 does not divide" in n for n in p.notes)


def test_known_shapes_match_published_parameter_counts():
    # linear parameters per PERF.md: 7B 6.48 B, Llama-3-8B 6.98 B, 70B 68.5 B
    for name, params in (("llama-2-7b", 6.48e9), ("llama-3-8b", 6.98e9), ("llama-2-70b", 68.5e9)):
        config = shape(name)
        n = config.num_hidden_layers * sum(i * o for i, o in plan.linear_shapes(config).values())
        assert abs(n - params) / params < 0.005, name
    for name in ("llama-2-13b", "llama-3-70b", "mistral-7b", "meta-llama/Llama-2-70b-hf", "LLAMA-2-70B"):
        assert plan.plan_model(name, device="h100-80gb").weights > 0


def test_awq_directory_uses_its_quantization_config(tmp_path):
    d = json.loads((plan.SHAPES_DIR / "llama-2-7b.json").read_text())
    d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                "version": "gemm", "modules_to_not_convert": ["down_proj"]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    p = plan.plan_model(str(tmp_path), device="h100-80gb")
    assert p.precision == "w4a16" and p.group_size == 64
    # down_proj stays fp16: 32 x 11008 x 4096 x 2 bytes
    assert items(p)["fp16 linears"] == 32 * 11008 * 4096 * 2
    with pytest.raises(TinychatError, match="group size 64"):
        plan.plan_model(str(tmp_path), group_size=128)
    with pytest.raises(TinychatError, match="AWQ"):
        plan.plan_model(str(tmp_path), precision="fp16")


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(TinychatError, match="known model name"):
        plan.plan_model("llama-9-1b")
    with pytest.raises(TinychatError, match="--device"):
        plan.plan_model("llama-2-7b", device="jetson-nano")
    with pytest.raises(TinychatError, match="does not divide the hidden size 576; use --group-size 64"):
        plan.plan_model("smollm2-135m-instruct", group_size=128)
    with pytest.raises(TinychatError, match="--group-size must be one of"):
        plan.plan_model("llama-2-7b", group_size=100)
    with pytest.raises(TinychatError, match="--context"):
        plan.plan_model("llama-2-7b", context=0)


def test_device_sizes():
    assert plan.parse_device("orin-64gb").unified
    assert plan.parse_device("25769803776").memory == 24 * GiB
    assert plan.parse_device("24GiB").memory == 24 * GiB
    assert plan.parse_device("24GB").memory == 24 * 10**9
    assert not plan.parse_device("24GB").unified


def test_prefill_chunk_matches_the_generator():
    from tinychat.generate import PREFILL_CHUNK

    assert plan.PREFILL_CHUNK == PREFILL_CHUNK


def test_cli_prints_table_and_verdict(capsys):
    assert cli.main(["plan", "--model", "llama-2-70b", "--group-size", "128", "--context", "4096",
                     "--device", "orin-64gb"]) == 0
    out = capsys.readouterr().out
    for word in ("quantized linears", "embeddings", "lm_head", "norms", "KV cache", "attention scores",
                 "allocator reserve", "OS and services", "total"):
        assert word in out
    assert out.strip().splitlines()[-1].startswith("fits: ")
    assert cli.main(["plan", "--model", "llama-2-70b", "--precision", "fp16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("does not fit: ")
    assert cli.main(["plan", "--model", "llama-2-7b", "--json", "--device", "24GiB"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == 3_965_198_336


def test_cli_errors_exit_2(capsys):
    assert cli.main(["plan", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinychat: error: ") and len(err.strip().splitlines()) == 1
    assert cli.main(["plan", "--model", "llama-2-7b", "--device", "lots"]) == 2
