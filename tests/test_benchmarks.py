"""The benchmarks' helpers and input checks (the timings themselves are benchmarks, not tests)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

from rfdit.benchmarking import _device_lines, _device_op_name, _library_kernel_kind, profile_ops, summarise_ops

from helpers import load_script


def test_profile_ops_attributes_time_to_the_compiled_ops(tmp_path):
    a, b = jr.normal(jr.key(0), (256, 256)), jr.normal(jr.key(1), (256, 256))
    options = {"xla_cpu_enable_xprof_traceme": True} if jax.default_backend() == "cpu" else {}
    compiled = jax.jit(lambda a, b: jnp.tanh(a @ b).T.sum(0)).lower(a, b).compile(compiler_options=options)
    rows = profile_ops(lambda: compiled(a, b), compiled.as_text(), 3, str(tmp_path))
    kinds = {r.kind for r in rows}
    assert "matmul" in kinds, rows
    assert all(r.ms_per_call > 0 and r.count_per_call > 0 for r in rows)
    assert all(r.name in compiled.as_text() for r in rows)
    text = summarise_ops(rows, wall_ms=1.0, top=5)
    assert "matmul" in text and "top 5 ops" in text


def test_library_kernels_of_a_gpu_trace_get_their_kind():
    # kernel names as an H100 trace recorded them (cuBLAS, cuDNN); XLA's own fusions match the HLO instead
    assert _library_kernel_kind("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "matmul"
    assert _library_kernel_kind("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x128x32") == "matmul"
    assert _library_kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert _library_kernel_kind("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>") == "attention"
    assert _library_kernel_kind("loop_add_fusion_27") == _library_kernel_kind("loop_convert_fusion_2") == "other"
    assert _library_kernel_kind("cudnn_infer_conv2d_fprop") == "convolution"


def test_gpu_kernel_events_map_to_their_hlo_instructions():
    ops = {"loop_add_fusion.27": ("elementwise", "", ""), "input_reduce-fusion.3": ("reduce", "", ""),
           "custom-call.5": ("matmul", "", "")}
    kernel_names = {"loop_add_fusion_27": "loop_add_fusion.27", "input_reduce_fusion_3": "input_reduce-fusion.3",
                    "custom_call_5": "custom-call.5"}
    assert _device_op_name("loop_add_fusion_27", ops, kernel_names) == "loop_add_fusion.27"
    assert _device_op_name("input_reduce_fusion_3", ops, kernel_names) == "input_reduce-fusion.3"
    assert _device_op_name("%custom-call.5 = ...", ops, kernel_names) == "custom-call.5"  # an "XLA Ops" event
    kernel = "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void*, unsigned int)"
    assert _device_op_name(kernel, ops, kernel_names) == "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>"

    class Line(NamedTuple):
        name: str

    streams = [Line("Stream #14(Memset,Compute)"), Line("XLA Modules"), Line("Steps"), Line("Stream #15(Compute)")]
    assert [line.name for line in _device_lines(streams)] == ["Stream #14(Memset,Compute)", "Stream #15(Compute)"]
    assert [line.name for line in _device_lines([*streams, Line("XLA Ops")])] == ["XLA Ops"]


def test_bench_vs_original_missing_checkout_says_what_to_pass(tmp_path):
    bench = load_script("benchmarks/bench_vs_original")
    with pytest.raises(SystemExit, match="diffusion_transformer.py.*kvfrans/jax-flow"):
        bench.main(["--original_dir", str(tmp_path)])


def test_bench_vs_original_missing_dependency_says_what_to_install(tmp_path):
    bench = load_script("benchmarks/bench_vs_original")
    (tmp_path / "diffusion_transformer.py").write_text("import rfdit_test_absent_module\n")
    with pytest.raises(SystemExit, match="rfdit_test_absent_module.*pip install flax einops ml_collections"):
        bench.main(["--original_dir", str(tmp_path)])


def test_bench_variants_compiles_each_variant_and_reports_it(monkeypatch):
    from rfdit.nn import layers

    bench = load_script("benchmarks/bench_variants")
    traced = {"einsum": 0, "xla": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traced[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layers, "einsum_attention", counted("einsum", layers.einsum_attention))
    # the training step's einsum attention on CPUs: its packed rule
    monkeypatch.setattr(layers.grad_rules, "packed_attention", counted("einsum", layers.grad_rules.packed_attention))
    monkeypatch.setattr(jax.nn, "dot_product_attention", counted("xla", jax.nn.dot_product_attention))
    variant = "attention=xla,grad_accum=2,xla:xla_cpu_enable_fast_math=true"
    precision_before = jax.config.jax_default_matmul_precision
    result = bench.main(["--config", "debug", "--rounds", "2", "--steps", "1", "--variants", variant])
    rows = {row["variant"]: row for row in result["variants"]}
    assert list(rows) == ["defaults", variant]
    assert rows["defaults"]["settings"]["grad_accum"] == 1 and rows[variant]["settings"]["grad_accum"] == 2
    assert rows[variant]["settings"]["xla"] == {"xla_cpu_enable_fast_math": True}
    assert rows["defaults"]["settings"]["attention"] == "default" and rows[variant]["settings"]["attention"] == "xla"
    assert traced["xla"] > 0 and (traced["einsum"] > 0 or jax.default_backend() != "cpu")  # variant, defaults
    assert all(row["ms_per_step"] > 0 and row["speedup"] > 0 and row["page_faults_per_step"] >= 0
               for row in rows.values())
    assert jax.config.jax_default_matmul_precision == precision_before  # set for the comparison only
    # a variant that does not compile is reported and left out; the others are timed
    result = bench.main(["--config", "debug", "--rounds", "1", "--steps", "1", "--variants", "xla:no_such_option=1",
                         "remat=none,precision=bf16"])
    assert [row["variant"] for row in result["variants"]] == ["defaults", "remat=none,precision=bf16"]
    assert [row["settings"]["dtype"] for row in result["variants"]] == ["float32", "bfloat16"]
    assert "no_such_option" in result["failed"]["xla:no_such_option=1"]


@pytest.mark.parametrize("variant, message", [
    ("grad_accum", "is not name=value"), ("heads=2", "unknown setting 'heads'"),
    ("scan_unroll=two", "positive integer"), ("grad_accum=0", "positive integer"),
    ("attention=flash", "must be one of"), ("remat=some", "must be one of"), ("precision=fp8", "must be one of"),
])
def test_bench_variants_bad_variant_says_what_is_accepted(variant, message):
    bench = load_script("benchmarks/bench_variants")
    with pytest.raises(SystemExit, match=message):
        bench.parse_variant(variant)


def test_bench_variants_refuses_a_repeated_variant():
    with pytest.raises(SystemExit, match="must differ"):
        load_script("benchmarks/bench_variants").main(["--variants", "remat=none", "remat=none"])


def test_bench_products_times_every_variant():
    bench = load_script("benchmarks/bench_products")
    result = bench.main(["--rounds", "1", "--size", "64", "--batch", "2", "--tokens", "4", "--width", "8",
                         "--hidden", "16", "--attention_batch", "2", "--attention_tokens", "4", "--heads", "1",
                         "--head_dim", "8"])
    assert set(result["matmul_tflops"]) == {"float32", "bf16 -> float32", "bf16 -> bf16", "float32 x bf16 -> float32"}
    assert len(result["linear_ms"]) == 4 and len(result["attention_ms"]) == 2
    assert all(v > 0 for group in ("matmul_tflops", "linear_ms", "attention_ms") for v in result[group].values())


def test_bench_host_times_each_part_of_the_call():
    result = load_script("benchmarks/bench_host").main(["--calls", "3", "--rounds", "1"])
    assert result["leaves"] > 10
    assert set(result["us_per_call"]) == {"eqx.partition", "eqx.combine", "TrainStep.arrays", "TrainStep rebuild",
                                          "jit dispatch, donated"}
    assert all(us > 0 for us in result["us_per_call"].values())
