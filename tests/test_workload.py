"""Workload construction and validation."""

import json

import pytest

from specplan.errors import InputError
from specplan.workload import Workload


def test_defaults_and_derived():
    w = Workload.make(prompt_len=[100, 300], gen_len=50, num_prompts=4)
    assert w.prompt_lens == (100, 300)
    assert w.acceptance == 0.7 and w.sampling == "greedy"
    assert w.mean_prompt_len == 200
    assert w.max_prompt_len == 300 and w.max_seq_len == 350
    assert [w.prompt_len_of(i) for i in range(4)] == [100, 300, 100, 300]


def test_acceptance_out_of_range_names_field_and_range():
    with pytest.raises(InputError) as ei:
        Workload.make(acceptance=1.5)
    msg = str(ei.value)
    assert "acceptance" in msg and "[0, 1]" in msg and "1.5" in msg
    assert ei.value.field == "acceptance"


@pytest.mark.parametrize("acc", [-0.1, [0.8, 1.2], [], float("nan"), "0.7", True])
def test_bad_acceptance_values(acc):
    with pytest.raises(InputError, match="acceptance"):
        Workload.make(acceptance=acc)


def test_acceptance_int_edges_accepted():
    assert Workload.make(acceptance=1).acceptance == 1.0
    assert Workload.make(acceptance=0).acceptance_rates(3) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("kw,field", [
    ({"gen_len": -5}, "gen_len"),
    ({"gen_len": 0}, "gen_len"),
    ({"num_prompts": 0}, "num_prompts"),
    ({"gen_len": 2.5}, "gen_len"),
    ({"prompt_len": []}, "prompt_len"),
    ({"prompt_len": [512, 0]}, "prompt_len"),
    ({"prompt_len": -1}, "prompt_len"),
    ({"sampling": "beam"}, "sampling"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_values_name_their_field(kw, field):
    with pytest.raises(InputError) as ei:
        Workload.make(**kw, source="wl.json")
    assert ei.value.field == field
    assert str(ei.value).startswith("wl.json: " + field)


def test_sampling_modes():
    assert Workload.make(sampling="sampling", temperature=0.8).sampling == "sampling"
    with pytest.raises(InputError) as ei:
        Workload.make(sampling="beam")
    assert "beam" in str(ei.value) and "greedy" in str(ei.value)


def test_acceptance_rates_scalar_and_table():
    assert Workload.make(acceptance=0.6).acceptance_rates(4) == (0.6, 0.6, 0.6, 0.6)
    w = Workload.make(acceptance=[0.9, 0.8, 0.7])
    assert w.acceptance == (0.9, 0.8, 0.7)
    assert w.acceptance_rates(2) == (0.9, 0.8)
    assert w.acceptance_rates(3) == (0.9, 0.8, 0.7)
    assert w.acceptance_rates(6) == (0.9, 0.8, 0.7, 0.7, 0.7, 0.7)
    assert w.acceptance_rates(0) == ()


def test_from_dict_unknown_field_is_named():
    with pytest.raises(InputError) as ei:
        Workload.from_dict({"gen_len": 64, "prompt_length": 100}, "wl.json")
    msg = str(ei.value)
    assert "prompt_length" in msg and "wl.json" in msg and "unknown" in msg


def test_from_dict_and_file_roundtrip(tmp_path):
    w = Workload.make(prompt_len=[64, 128], gen_len=32, num_prompts=10, acceptance=[0.9, 0.6], seed=3)
    d = w.to_dict()
    assert Workload.from_dict(d, "x") == w
    path = tmp_path / "wl.json"
    path.write_text(json.dumps(d))
    assert Workload.from_file(str(path)) == w
    assert Workload.from_dict({"prompt_len": 7}, "x").prompt_lens == (7,)


def test_from_dict_bad_value_names_source(tmp_path):
    path = tmp_path / "wl.json"
    path.write_text(json.dumps({"acceptance": 2}))
    with pytest.raises(InputError) as ei:
        Workload.from_file(str(path))
    assert str(path) in str(ei.value) and "acceptance" in str(ei.value)
    with pytest.raises(InputError, match="not an object"):
        Workload.from_dict([1], "x")


def test_acceptance_spread_checked_and_round_tripped():
    wl = Workload.make(acceptance=0.6, acceptance_spread=0.2)
    assert Workload.from_dict(wl.to_dict(), "w") == wl
    assert "acceptance_spread" not in Workload.make().to_dict()  # plans made before it keep their hash
    with pytest.raises(InputError, match="acceptance_spread.*a number >= 0"):
        Workload.make(acceptance_spread=-0.1, source="w.json")
    with pytest.raises(InputError, match=r"w.json.*acceptance_spread.*below sqrt"):
        Workload.from_dict({"acceptance": 0.9, "acceptance_spread": 0.4}, "w.json")
    with pytest.raises(InputError, match="acceptance_spread"):
        Workload.make(acceptance=1.0, acceptance_spread=0.1)
