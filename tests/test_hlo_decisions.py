"""benchmarks/hlo_decisions.py: the compiler's choices read from optimised HLO text, and their differences."""
from benchmarks import hlo_decisions

_CUBLAS = ('  %custom-call.7 = (bf16[8192,384]{{1,0}}, s8[33554432]{{0}}) custom-call(%a, %b), '
           'custom_call_target="__cublas$lt$matmul", metadata={{op_name="jit(train_step)/mlp/dot_general"}}, '
           'backend_config={{"gemm_backend_config":{{"alpha_real":1,"selected_algorithm":"{alg}"}},'
           '"operation_queue_id":"0"}}')
_TRITON = ('  %input_reduce_fusion.3 = f32[384]{{0}} fusion(%p), kind=kCustom, calls=%fused_reduce.3, '
           'metadata={{op_name="jit(train_step)/transpose(jvp())/dwconv/reduce_sum"}}, backend_config={{'
           '"fusion_backend_config":{{"block_level_fusion_config":{{"is_tma_allowed":{tma},"num_ctas":1,'
           '"num_stages":1,"num_warps":"{warps}","output_tiles":[{{"sizes":["16"]}}]}},"kind":"__triton"}},'
           '"operation_queue_id":"0"}}')
_NATIVE = ('  %input_reduce_fusion.3 = f32[384]{0} fusion(%p), kind=kInput, calls=%fused_reduce.3, '
           'metadata={op_name="jit(train_step)/transpose(jvp())/dwconv/reduce_sum"}')
_PALLAS = ('  ROOT %pallas_call.9 = f32[32,256,192]{2,1,0} custom-call(%x), custom_call_target='
           '"__gpu$xla.gpu.triton", metadata={op_name="jit(train_step)/gla_op/pallas_call"}')


def _module(alg="2", reduction=None):
  return "\n".join(["HloModule m", "ENTRY %main {", _CUBLAS.format(alg=alg),
                    reduction or _TRITON.format(tma="true", warps="2"), _PALLAS,
                    "  %add.1 = f32[] add(%a, %b)", "}"])


def test_reads_each_fusion_and_custom_call_with_its_choice_name_and_size():
  found = hlo_decisions.decisions(_module())
  assert set(found) == {"custom-call.7", "input_reduce_fusion.3", "pallas_call.9"}  # the add has no choice
  gemm = found["custom-call.7"]
  assert (gemm.kind, gemm.choice, gemm.out_bytes) == ("__cublas$lt$matmul", "algorithm 2", 8192 * 384 * 2)
  assert gemm.op_name == "jit(train_step)/mlp/dot_general"                # the workspace is not counted
  reduction = found["input_reduce_fusion.3"]
  assert (reduction.kind, reduction.choice, reduction.out_bytes) == (
      "__triton", "tiles=16 warps=2 stages=1 ctas=1 tma", 384 * 4)
  assert found["pallas_call.9"].choice == "fixed"
  assert hlo_decisions.decisions(_NATIVE)["input_reduce_fusion.3"][:2] == ("native", "kInput")


def test_compare_lists_changed_choices_by_category_largest_first():
  fast = hlo_decisions.decisions(_module())
  assert hlo_decisions.compare(fast, fast)["changed"] == []
  slow = hlo_decisions.decisions(_module(alg="0", reduction=_NATIVE))
  result = hlo_decisions.compare(fast, slow)
  assert result["changed_by_category"] == {"cublas algorithm": 1, "emitter": 1}
  assert [c["name"] for c in result["changed"]] == ["custom-call.7", "input_reduce_fusion.3"]
  assert result["changed"][0]["first"] == "__cublas$lt$matmul: algorithm 2"
  assert result["changed"][0]["second"] == "__cublas$lt$matmul: algorithm 0"
  retuned = hlo_decisions.decisions(_module(reduction=_TRITON.format(tma="false", warps="4")))
  assert hlo_decisions.compare(fast, retuned)["changed_by_category"] == {"triton config": 1}
  text = hlo_decisions.format_comparison(result, ("fast", "slow"))
  assert "cublas algorithm 1, emitter 1" in text
  assert "algorithm 2  ->  __cublas$lt$matmul: algorithm 0" in text


def test_reads_gzipped_modules(tmp_path):
  import gzip
  path = tmp_path / "m.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write(_module())
  assert hlo_decisions.read_text(str(path)) == _module()
