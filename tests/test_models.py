"""ModelSpec: parameter counts, byte breakdowns and input validation."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import pytest

from specplan.errors import InputError, UnknownNameError
from specplan.formats import parse_weights
from specplan.models import ModelSpec

GB = 1e9

# Published totals (model cards / safetensors metadata).
PUBLISHED_PARAMS = {
    "mixtral-8x7b": 46.7e9,
    "mixtral-8x22b": 141e9,
    "llama-3.3-70b": 70.6e9,
    "mistral-7b-v0.2": 7.24e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.2-1b": 1.24e9,
    "qwen2.5-7b": 7.62e9,
    "smollm2-135m": 134.5e6,
}


@pytest.mark.parametrize("name,published", sorted(PUBLISHED_PARAMS.items()))
def test_preset_param_count_matches_published(name, published):
    spec = ModelSpec.from_preset(name)
    assert spec.total_params == pytest.approx(published, rel=0.005)


def test_preset_names_case_insensitive():
    assert ModelSpec.from_preset("Mixtral-8x7B").total_params == ModelSpec.from_preset("mixtral-8x7b").total_params


# ---- against transformers ----------------------------------------------------------------------

SHRINK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)


def _shrunk(preset: str, **extra) -> dict:
    cfg = dict(ModelSpec.from_preset(preset).hf_config)
    cfg.pop("_source", None)
    cfg.update(SHRINK)
    if "head_dim" in cfg:
        cfg["head_dim"] = 16
    if "num_local_experts" in cfg:
        cfg["num_local_experts"] = 4
    cfg.update(extra)
    return cfg


def _hf_param_count(cfg: dict) -> tuple[int, str]:
    transformers = pytest.importorskip("transformers")
    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    # parameters() yields a tied embedding / lm_head tensor once.
    return sum(p.numel() for p in model.parameters()), type(model).__name__


@pytest.mark.parametrize("preset,arch", [
    ("mixtral-8x7b", "MixtralForCausalLM"),
    ("mistral-7b-v0.2", "MistralForCausalLM"),
    ("llama-3.1-8b", "LlamaForCausalLM"),  # keeps rope_scaling (llama3)
    ("llama-3.2-1b", "LlamaForCausalLM"),  # tied embeddings, explicit head_dim
    ("smollm2-135m", "LlamaForCausalLM"),  # tied embeddings, no head_dim
    ("qwen2.5-7b", "Qwen2ForCausalLM"),  # q/k/v biases
])
def test_param_count_matches_transformers(preset, arch):
    cfg = _shrunk(preset)
    n_hf, cls_name = _hf_param_count(cfg)
    assert cls_name == arch
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.arch == arch
    assert spec.total_params == n_hf


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "mistral-7b-v0.2", "mixtral-8x7b", "qwen2.5-7b"])
def test_param_count_matches_transformers_non_default_head_dim(preset):
    # head_dim * heads != hidden: q/o projections are not square.
    cfg = _shrunk(preset, head_dim=24)
    n_hf, _ = _hf_param_count(cfg)
    assert ModelSpec.from_hf_config(cfg).total_params == n_hf


def test_param_count_matches_transformers_mixtral_top1_of_8():
    cfg = _shrunk("mixtral-8x7b", num_local_experts=8, num_experts_per_tok=1)
    n_hf, _ = _hf_param_count(cfg)
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.experts == 8 and spec.top_k == 1
    assert spec.total_params == n_hf


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "mistral-7b-v0.2", "mixtral-8x7b", "qwen2.5-7b"])
def test_param_count_matches_transformers_attention_bias(preset):
    # transformers: Llama's attention_bias puts a bias on q, k, v AND o; Mistral and Mixtral
    # ignore the key (no attention biases); Qwen2 always has q/k/v biases and no o bias.
    cfg = _shrunk(preset, attention_bias=True)
    n_hf, _ = _hf_param_count(cfg)
    assert ModelSpec.from_hf_config(cfg).total_params == n_hf


def test_param_count_matches_transformers_llama_mlp_bias():
    # LlamaConfig.mlp_bias puts a bias on gate, up and down projections.
    cfg = _shrunk("llama-3.1-8b", mlp_bias=True)
    n_hf, _ = _hf_param_count(cfg)
    assert ModelSpec.from_hf_config(cfg).total_params == n_hf


# ---- bytes from the brief ---------------------------------------------------------------------


def test_mixtral_8x7b_bytes():
    s = ModelSpec.from_preset("mixtral-8x7b")
    assert s.dtype == "bfloat16" and s.dtype_bytes == 2
    lb = s.layer_bytes
    assert lb.experts == 8
    assert lb.ffn == pytest.approx(2.82 * GB, rel=0.01)
    assert lb.ffn == 8 * lb.expert
    assert lb.attention * s.layers == pytest.approx(2.7 * GB, rel=0.02)
    assert s.kv_bytes_per_token == 131072
    assert s.kv_bytes_per_token_per_layer == 131072 / 32
    # Every byte accounted for: layers + embeddings + lm_head + final norm.
    assert s.total_bytes == pytest.approx(s.layers * lb.total + s.embed_bytes + s.lm_head_bytes + s.hidden * 2)


def test_mixtral_8x22b_bytes():
    s = ModelSpec.from_preset("mixtral-8x22b")
    lb = s.layer_bytes
    assert lb.ffn == pytest.approx(4.83 * GB, rel=0.01)
    assert lb.attention * s.layers == pytest.approx(9.9 * GB, rel=0.02)
    assert s.kv_bytes_per_token == 229376


def test_moe_active_params_smaller_than_total():
    s = ModelSpec.from_preset("mixtral-8x7b")
    assert s.is_moe and s.top_k == 2
    # Mixtral 8x7B: ~12.9B active per token (published), incl. the LM head.
    assert s.active_params_per_token == pytest.approx(12.9e9, rel=0.02)
    dense = ModelSpec.from_preset("mistral-7b-v0.2")
    assert not dense.is_moe and dense.layer_bytes.router == 0


def test_tied_embeddings_have_no_lm_head_bytes():
    s = ModelSpec.from_preset("llama-3.2-1b")
    assert s.tie_embeddings
    assert s.lm_head_params == 0 and s.lm_head_bytes == 0
    assert s.embed_params == 128256 * 2048


def test_weight_formats_count_codes_scales_and_zero_points():
    s = ModelSpec.from_preset("mixtral-8x7b")
    i8, i4 = (s.with_weights(parse_weights(w).fixed) for w in ("int8", "int4"))
    h, f = s.hidden, s.ffn_inner
    assert i8.layer_bytes.expert == 3 * h * f + (2 * f + h) * 2  # one byte a weight, a float16 scale a row
    assert i4.layer_bytes.expert == 3 * h * f / 2 + 3 * h * f / 64 * 4  # half a byte, scale + zero per 64
    assert i4.layer_bytes.norms == s.layer_bytes.norms and i4.layer_bytes.router == s.layer_bytes.router
    assert i4.kv_bytes_per_token == s.kv_bytes_per_token  # the KV stays in the compute dtype
    assert i4.embed_bytes == s.embed_bytes and i4.head_bytes == s.head_bytes  # a bare format: the layers only
    assert i4.total_params == s.total_params
    with pytest.raises(InputError, match="int3"):
        parse_weights("int3")
    with pytest.raises(InputError, match="dtype"):
        s.with_dtype("int8")


def test_flops_per_token_grows_with_context():
    s = ModelSpec.from_preset("mixtral-8x7b")
    f = [s.flops_per_token(c) for c in (0, 1, 128, 4096, 32768)]
    assert all(b > a for a, b in zip(f, f[1:]))
    assert f[0] == 2 * s.active_params_per_token
    # attention term is linear in context
    assert f[4] - f[3] == pytest.approx((f[3] - f[0]) * (32768 - 4096) / 4096)


def test_to_dict_is_json_serialisable():
    d = ModelSpec.from_preset("qwen2.5-7b").to_dict()
    json.dumps(d)
    assert "hf_config" not in d
    assert d["total_params"] == ModelSpec.from_preset("qwen2.5-7b").total_params


# ---- bad input -----------------------------------------------------------------------------


def test_unknown_preset_suggests_close_name():
    with pytest.raises(UnknownNameError) as ei:
        ModelSpec.from_preset("mixtrl")
    assert "mixtral-8x7b" in str(ei.value)
    assert "mixtral-8x7b" in ei.value.suggestions
    assert "unknown model" in str(ei.value)


def _write_cfg(tmp_path, **changes):
    cfg = dict(ModelSpec.from_preset("mistral-7b-v0.2").hf_config)
    cfg.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_file_roundtrip(tmp_path):
    path = _write_cfg(tmp_path)
    assert ModelSpec.from_file(path).total_params == ModelSpec.from_preset("mistral-7b-v0.2").total_params
    # a directory holding config.json works too, and resolve() takes either
    assert ModelSpec.from_file(tmp_path).total_params == ModelSpec.resolve(str(path)).total_params


def test_negative_layers_in_file_names_file_and_field(tmp_path):
    path = _write_cfg(tmp_path, num_hidden_layers=-3)
    with pytest.raises(InputError) as ei:
        ModelSpec.from_file(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "num_hidden_layers" in msg
    assert "-3" in msg


@pytest.mark.parametrize("key,value", [("hidden_size", 0), ("vocab_size", "32000"), ("intermediate_size", None)])
def test_bad_required_ints_rejected(tmp_path, key, value):
    path = _write_cfg(tmp_path, **{key: value})
    with pytest.raises(InputError, match=key):
        ModelSpec.from_file(path)


@pytest.mark.parametrize("key,value", [("num_key_value_heads", -8), ("head_dim", -128)])
def test_negative_head_shapes_rejected(tmp_path, key, value):
    # A negative KV head count divides the head count (32 % -8 == 0) and a negative head_dim
    # is taken as given; both produce negative KV-cache bytes instead of an error.
    path = _write_cfg(tmp_path, **{key: value})
    with pytest.raises(InputError) as ei:
        ModelSpec.from_file(path)
    assert key in str(ei.value)


def test_kv_heads_not_dividing_heads_rejected(tmp_path):
    path = _write_cfg(tmp_path, num_key_value_heads=5)
    with pytest.raises(InputError, match="num_key_value_heads"):
        ModelSpec.from_file(path)


def test_unsupported_architecture(tmp_path):
    path = _write_cfg(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(InputError) as ei:
        ModelSpec.from_file(path)
    assert "GPT2LMHeadModel" in str(ei.value)
    assert str(path) in str(ei.value)


def test_unsupported_model_type_without_architectures():
    cfg = dict(ModelSpec.from_preset("mistral-7b-v0.2").hf_config)
    cfg.pop("architectures")
    cfg["model_type"] = "gpt_neox"
    with pytest.raises(InputError, match="model_type"):
        ModelSpec.from_hf_config(cfg)
    mix = dict(ModelSpec.from_preset("mixtral-8x7b").hf_config)
    mix.pop("architectures")  # model_type alone is enough when supported
    assert ModelSpec.from_hf_config(mix).arch == "MixtralForCausalLM"


def test_invalid_json_names_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 4096,,}')
    with pytest.raises(InputError) as ei:
        ModelSpec.from_file(path)
    assert str(path) in str(ei.value)
    assert "invalid JSON" in str(ei.value)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ModelSpec.from_file(tmp_path / "nope.json")
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        ModelSpec.from_file(path)


def test_top_k_above_experts_rejected():
    cfg = dict(ModelSpec.from_preset("mixtral-8x7b").hf_config, num_experts_per_tok=9)
    with pytest.raises(InputError, match="num_experts_per_tok"):
        ModelSpec.from_hf_config(cfg)
