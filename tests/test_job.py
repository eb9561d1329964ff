"""The dataset job (specrun --prompts DATA --output OUT.jsonl [--resume]): inputs read and
checked with their line numbers, results streamed one line per row, a torn last line cut
off on resume, another job's output refused, per-row max_tokens and stop strings ending rows
inside the engine, and a kill-and-resume run equal to an uninterrupted one."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

from specplan.errors import InputError
from specplan.models import ModelSpec

from specplan.runtime.jobio import JobWriter, read_dataset, read_done, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "user:", "assistant:", "a", "dog"]


def tokenizer_dir(d: Path, chat: bool = True) -> Path:
    """A word-level tokenizer (ids < tiny-llama's 256), saved as a HF tokenizer, with a chat
    template or without."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    if chat:
        fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    fast.save_pretrained(d)
    return d


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- reading -------------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_ids_and_get_line_numbers_otherwise(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [{"id": "a", "prompt": [5, 6, 7]}, "", {"prompt": [8, 9], "max_tokens": 3},
                                           {"id": 7, "prompt": [1, 2], "stop": "x"}])
    rows = read_dataset(f, None, 256).rows
    assert [(r.id, r.ids, r.max_tokens, r.stop) for r in rows] == [
        ("a", (5, 6, 7), None, ()), ("3", (8, 9), 3, ()), ("7", (1, 2), None, ("x",))]


def test_messages_go_through_the_chat_template(tmp_path):
    tdir = tokenizer_dir(tmp_path / "tok")
    f = write_lines(tmp_path / "d.jsonl", [{"id": "c", "messages": [{"role": "user", "content": "hello world"}]},
                                           {"id": "t", "prompt": "the cat sat"}])
    rows = read_dataset(f, tdir, 256).rows
    assert rows[0].ids == (9, 2, 3, 10)  # "user: hello world assistant:", word by word
    assert rows[1].ids == (4, 5, 6)


@pytest.mark.parametrize("rows, column, match", [
    (['{"id": 1, "prompt": [1, 2]', ], None, r"line 1: is not JSON"),
    ([{"id": 1, "prompt": [1, 2]}, "[1, 2"], None, r"line 2: is not JSON"),
    ([{"id": "x", "prompt": [1]}, {"id": "x", "prompt": [2]}], None, r"id 'x': appears twice \(rows 1 and 2\)"),
    ([{"id": 1, "text": [1, 2]}], "prompt", r"line 1: prompt: is missing"),
    ([{"id": 1, "prompt": [1, 2], "temperature": -0.5}], None, r"line 1: temperature: got -0.5"),
    ([{"id": 1, "prompt": [1, 2], "temperature": True}], None, r"line 1: temperature: got True"),
    ([{"id": 1, "prompt": [1, 2], "temperature": 1e-9}], None, r"line 1: temperature: got 1e-09"),
    ([{"id": 1, "prompt": [1, 2], "seed": -1}], None, r"line 1: seed: got -1"),
    ([{"id": 1, "prompt": [1, 2], "top_p": 0}], None, r"line 1: top_p: got 0 \(expected a probability mass"),
    ([{"id": 1, "prompt": [1, 2], "top_k": 1.5}], None, r"line 1: top_k: got 1.5"),
    ([{"id": 1, "prompt": [1, 2], "seed": "7"}], None, r"line 1: seed: got '7'"),
    ([{"id": 1, "prompt": [1, 2], "colour": "red"}], None, r"line 1: colour: unknown field"),
    ([{"id": 1}], None, r"line 1: needs exactly one of 'prompt' and 'messages'"),
    ([{"id": 1, "prompt": [1, 2], "max_tokens": 0}], None, r"line 1: max_tokens: got 0"),
    ([{"id": 1, "prompt": [1, 999]}], None, r"id '1': has token ids outside the vocabulary"),
    ([{"id": 1, "prompt": "2024"}], None, r"line 1: is text, and the target has no tokenizer"),
    ([{"id": 1, "prompt": []}], None, r"line 1: prompt: is empty"),
    ([{"id": 1, "prompt": "hello there"}], None, r"line 1: is text, and the target has no tokenizer"),
    ([{"id": 1, "messages": [{"role": "user", "content": "hi"}]}], None, r"line 1: is text, and the target has no tokenizer"),
])
def test_bad_rows_are_refused_with_their_line(tmp_path, rows, column, match):
    f = write_lines(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=match):
        read_dataset(f, None, 256, column)


def test_a_missing_chat_template_is_refused(tmp_path):
    tdir = tokenizer_dir(tmp_path / "tok", chat=False)
    f = write_lines(tmp_path / "d.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "hello"}]}])
    with pytest.raises(InputError, match="need a chat template"):
        read_dataset(f, tdir, 256)


# ---- writing and resuming -------------------------------------------------------------------------------


def test_a_torn_last_line_is_cut_off_and_the_job_goes_on(tmp_path):
    out = tmp_path / "out.jsonl"
    ident = {"plan": "p", "input_sha256": "i"}
    w, done = JobWriter.open(out, ident, resume=False)
    w.write({"id": "a", "token_ids": [1]})
    w.write({"id": "b", "token_ids": [2]})
    w.close()
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "tok')  # a kill mid-write
    assert read_done(out)[0] == {"a", "b"}
    w, done = JobWriter.open(out, ident, resume=True)
    assert done == {"a", "b"}
    w.write({"id": "c", "token_ids": [3]})
    w.close()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]


def test_written_rows_are_fsynced_within_the_interval_even_when_no_more_rows_come(tmp_path, monkeypatch):
    import os
    import threading
    import time

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(time.monotonic()), real(fd)))
    w, _ = JobWriter.prepare(tmp_path / "out.jsonl", {"plan": "p"}, resume=False)
    w.fsync_every_s = 0.05
    w.start()
    synced.clear()  # the new file's directory entry
    t0 = time.monotonic()
    w.write({"id": "a", "token_ids": [1]})
    deadline = time.monotonic() + 5
    while w.syncs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.syncs == 1 and len(synced) == 1 and synced[0] - t0 < 2  # no second write was needed
    time.sleep(0.2)
    assert w.syncs == 1  # nothing new written: nothing synced
    w.close()
    assert not any(t.name == "output-fsync" for t in threading.enumerate())


def test_resume_refuses_another_jobs_output_and_a_new_job_an_existing_one(tmp_path):
    out = tmp_path / "out.jsonl"
    w, _ = JobWriter.open(out, {"plan": "p", "input_sha256": "i"}, resume=False)
    w.close()
    with pytest.raises(InputError, match=r"out.jsonl.job.json: input_sha256: differ from this job's"):
        JobWriter.open(out, {"plan": "p", "input_sha256": "other"}, resume=True)
    with pytest.raises(InputError, match=r"exists \(expected --resume"):
        JobWriter.open(out, {"plan": "p", "input_sha256": "i"}, resume=False)
    sidecar_path(out).unlink()
    with pytest.raises(InputError, match="has no out.jsonl.job.json beside it"):
        JobWriter.open(out, {"plan": "p", "input_sha256": "i"}, resume=True)


def test_the_input_is_known_by_its_content_so_a_renamed_copy_resumes_and_an_edited_one_does_not(tmp_path):
    from specplan.runtime.jobio import job_identity

    a, b, c = tmp_path / "data.jsonl", tmp_path / "elsewhere" / "copy.jsonl", tmp_path / "edited.jsonl"
    a.write_text('{"id": "x", "prompt": [1, 2]}\n')
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    c.write_text('{"id": "x", "prompt": [1, 3]}\n')
    ident = [job_identity("p", "t", None, read_dataset(f, None, 256), {}) for f in (a, b, c)]
    assert ident[0] == ident[1] and ident[0] != ident[2]
    out = tmp_path / "out.jsonl"
    w, _ = JobWriter.open(out, ident[0], resume=False)
    w.write({"id": "x", "token_ids": [1]})
    w.close()
    assert JobWriter.prepare(out, ident[1], resume=True, input_ids={"x"})[1] == {"x"}
    with pytest.raises(InputError, match="input_sha256"):
        JobWriter.prepare(out, ident[2], resume=True, input_ids={"x"})


def test_an_output_whose_job_file_has_the_earlier_format_still_resumes(tmp_path):
    """.job.json files written before the input counted by its content hold its path and a hash
    of its name and bytes: their outputs resume, and the next start rewrites the file."""
    import hashlib

    from specplan.runtime.jobio import job_identity, legacy_identity

    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "x", "prompt": [1, 2]}\n')
    dataset = read_dataset(data, None, 256)
    ident = job_identity("p", "t", None, dataset, {"seed": 0})
    earlier = {"plan": "p", "target": "t", "draft": None, "input": str(data.resolve()),
               "input_sha256": hashlib.sha256(b"data.jsonl" + data.read_bytes()).hexdigest()[:16], "settings": {"seed": 0}}
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "x", "token_ids": [1]}) + "\n")
    sidecar_path(out).write_text(json.dumps(earlier))
    with pytest.raises(InputError, match="input_sha256: differ"):
        JobWriter.prepare(out, ident, resume=True)
    w, done = JobWriter.prepare(out, ident, resume=True, legacy=lambda: legacy_identity(ident, dataset))
    assert done == {"x"}
    w.start()
    w.close()
    assert json.loads(sidecar_path(out).read_text()) == ident  # the new format from now on
    other = dict(earlier, settings={"seed": 1})
    sidecar_path(out).write_text(json.dumps(other))
    with pytest.raises(InputError, match="settings: differ"):
        JobWriter.prepare(out, ident, resume=True, legacy=lambda: legacy_identity(ident, dataset))


def _output(path: Path, ids: list[str]) -> list[dict]:
    lines = [{"id": i, "token_ids": [n]} for n, i in enumerate(ids)]
    w, _ = JobWriter.open(path, {"plan": "p"}, resume=False)
    for rec in lines:
        w.write(rec)
    w.close()
    return lines


def test_resume_refuses_an_id_written_twice_or_not_in_the_input_and_repair_drops_those_lines(tmp_path):
    inputs = {"a", "b", "c", "d"}
    dup, stray = tmp_path / "dup.jsonl", tmp_path / "stray.jsonl"
    _output(dup, ["a", "b", "a"])
    _output(stray, ["a", "zz"])
    before = {f: f.read_bytes() for f in (dup, stray)}
    with pytest.raises(InputError, match=r"dup.jsonl: id 'a': has two result lines"):
        JobWriter.prepare(dup, {"plan": "p"}, resume=True, input_ids=inputs)
    with pytest.raises(InputError, match=r"stray.jsonl: id 'zz': is not in the input"):
        JobWriter.prepare(stray, {"plan": "p"}, resume=True, input_ids=inputs)
    assert {f: f.read_bytes() for f in (dup, stray)} == before  # a refusal changes nothing

    out = tmp_path / "out.jsonl"
    lines = _output(out, ["a", "b", "a", "zz", "c"])
    said: list[str] = []
    _, done = JobWriter.prepare(out, {"plan": "p"}, resume=True, input_ids=inputs, repair=True, say=said.append)
    assert done == {"a", "b", "c"}
    assert [json.loads(x) for x in out.read_text().splitlines()] == [lines[0], lines[1], lines[4]]  # first lines kept
    assert len(said) == 2 and "'a'" in said[0] and "'zz'" in said[1] and "not in the input" in said[1]


# ---- rows that end early, and the whole job ----------------------------------------------------------------


def _engine(gen_len=8):
    from specplan.plan import Placement, Schedule
    from specplan.runtime.checkpoint import open_checkpoint
    from specplan.runtime.engine import Engine

    spec = ModelSpec.from_preset("tiny-llama")
    sch = Schedule(policy="spec-serial", target_batch=4, num_batches=1, prefill_chunk=4, draft_batch=4, gamma=3,
                   prefetch_depth=1, admission="continuous", prefill_tokens=32).validate()
    pl = Placement(attention="gpu", ffn="gpu", embed="gpu", lm_head="gpu", draft_kv="gpu")
    t, d = open_checkpoint(spec, None, True, 0), open_checkpoint(spec, None, True, 0)
    return Engine(sch, pl, t, d, torch.device("cpu"), rows=4, max_prompt_len=8, gen_len=gen_len)


def test_rows_sample_by_their_own_settings_whatever_their_batch(tmp_path):
    """Per-row sampling in one batch (spec-serial, continuous admission, 4 slots for 10 rows):
    greedy rows equal a greedy run, a top-k 1 row is greedy too, sampled rows differ from
    greedy, and a sampled row's tokens depend on its seed only, not on which rows ran beside
    it (the same row alone, or among others, gives the same tokens)."""
    from specplan.runtime.sampling import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(2, 250) for _ in range(rng.randrange(3, 8))] for _ in range(10)]
    greedy = _engine().generate(prompts)
    base = SamplingParams(temperature=1.0, seed=5)
    rows = [base.row(i, temperature=0.0) if i % 3 == 0 else base.row(i, top_k=1) if i % 3 == 1
            else base.row(i, seed=100 + i, top_p=0.9) for i in range(10)]
    mixed = _engine().generate(prompts, sampling=rows)
    for i in range(10):
        if i % 3 != 2:
            assert mixed[i] == greedy[i], i
    sampled = [i for i in range(10) if i % 3 == 2]
    assert any(mixed[i] != greedy[i] for i in sampled)
    for i in sampled:  # alone, and among other rows in another order
        assert _engine().generate([prompts[i]], sampling=[rows[i]])[0] == mixed[i]
    order = [8, 2, 0, 5, 3]
    again = _engine().generate([prompts[i] for i in order], sampling=[rows[i] for i in order])
    assert [again[order.index(i)] for i in (2, 5, 8)] == [mixed[i] for i in (2, 5, 8)]
    # a row's own seed keys its stream: the same seed at another index gives the same tokens
    moved = _engine().generate([prompts[0], prompts[2]], sampling=[rows[0], base.row(7, seed=102, top_p=0.9)])
    assert moved[1] == mixed[2]


def test_max_tokens_and_stop_end_rows_inside_the_engine_and_free_their_slots():
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 250) for _ in range(rng.randrange(3, 8))] for _ in range(10)]
    whole = _engine().generate(prompts)
    finished: dict[int, tuple[list[int], str]] = {}
    # row 2 stops as soon as it has produced its third token (a "stop string" on ids)
    limits = [3 if i % 3 == 0 else 8 for i in range(10)]
    out = _engine().generate(prompts, limits=limits, stop=lambda r, toks: r == 2 and len(toks) >= 3,
                             on_finish=lambda r, toks, why: finished.setdefault(r, (toks, why)))
    for i in range(10):
        n = 3 if i % 3 == 0 or i == 2 else 8
        assert out[i] == whole[i][:n] if i != 2 else out[i][:3] == whole[i][:3]
        assert finished[i][0] == out[i]
        assert finished[i][1] == ("stop" if i == 2 else "length")
    assert len(out[2]) <= 3 + 3  # a verification may add up to gamma tokens past the stop before it is seen


def test_a_killed_job_resumed_three_times_equals_an_uninterrupted_one(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kill_resume as kr

    args = kr.make_job(tmp_path, prompts=24, gen_len=12, rows=4)
    kr.specrun([*args, "--output", str(tmp_path / "whole.jsonl")], tmp_path)
    whole = kr.results(tmp_path / "whole.jsonl")
    killed = kr.kill_and_resume(tmp_path, args, kills=3, rng=random.Random(1), total=24, say=lambda m: None)
    assert sorted(killed) == sorted(whole) == sorted(f"row-{i}" for i in range(24))
    assert killed == whole


def test_a_sampled_job_with_per_row_settings_resumes_to_the_same_output(tmp_path):
    """Temperature 0.8, top-p 0.9 from the command line, rows with their own temperature, seed
    or top-k: killed twice and resumed, the output equals the uninterrupted run's, and the
    rows' own settings show (greedy rows equal a greedy run, sampled rows do not)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kill_resume as kr

    args = kr.make_job(tmp_path, prompts=16, gen_len=12, rows=4, sample=True)
    kr.specrun([*args, "--output", str(tmp_path / "whole.jsonl")], tmp_path)
    whole = kr.results(tmp_path / "whole.jsonl")
    killed = kr.kill_and_resume(tmp_path, args, kills=2, rng=random.Random(2), total=16, say=lambda m: None)
    assert killed == whole
    (tmp_path / "g").mkdir()
    greedy_args = kr.make_job(tmp_path / "g", prompts=16, gen_len=12, rows=4)
    kr.specrun([*greedy_args, "--output", str(tmp_path / "g" / "greedy.jsonl")], tmp_path / "g")
    greedy = kr.results(tmp_path / "g" / "greedy.jsonl")
    own = kr.ROW_SAMPLING
    assert all(whole[f"row-{i}"] == greedy[f"row-{i}"] for i in range(16) if own[i % len(own)] == {"temperature": 0.0})
    assert sum(whole[f"row-{i}"] != greedy[f"row-{i}"] for i in range(16) if own[i % len(own)] != {"temperature": 0.0}) >= 6


def test_specrun_writes_text_and_finish_reasons_for_a_chat_dataset(tmp_path, monkeypatch, capsys):
    from specplan.runtime import cli

    spec = ModelSpec.from_preset("tiny-llama")
    cfg = transformers.CONFIG_MAPPING["llama"].from_dict(spec.hf_config)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(model_dir)
    tokenizer_dir(model_dir)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kill_resume as kr

    kr.make_job(tmp_path, prompts=6, gen_len=6, rows=4)
    write_lines(tmp_path / "chat.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": "the cat sat on a mat"}], "max_tokens": 2 + i % 3}
        for i in range(6)])
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "argv", ["specrun", "--plan", str(tmp_path / "plan.json"), "--target", str(model_dir),
                                      "--draft", str(model_dir), "--device", "cpu", "--force", "--ignore-eos",
                                      "--prompts", str(tmp_path / "chat.jsonl"), "--output", str(out),
                                      "--report", str(tmp_path / "r.json")])
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == [f"c{i}" for i in range(6)]
    for r in lines:
        i = int(r["id"][1:])
        assert r["generated_tokens"] == len(r["token_ids"]) == 2 + i % 3 and r["finish_reason"] == "length"
        assert isinstance(r["text"], str) and r["prompt_tokens"] == 8
    assert "outputs" not in json.loads((tmp_path / "r.json").read_text())


def test_parquet_and_a_datasets_directory_are_read_with_their_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": ["p0", "p1"], "text": [[1, 2, 3], [4, 5]], "max_tokens": [3, None]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = read_dataset(tmp_path / "d.parquet", None, 256, column="text").rows
    assert [(r.id, r.ids, r.max_tokens) for r in rows] == [("p0", (1, 2, 3), 3), ("p1", (4, 5), None)]
    with pytest.raises(InputError, match=r"column prompt: does not exist \(expected --column one of id, text"):
        read_dataset(tmp_path / "d.parquet", None, 256)
    # save_to_disk's layout: arrow IPC stream shards beside dataset_info.json and state.json
    ds = tmp_path / "ds"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    again = read_dataset(ds, None, 256, column="text").rows
    assert again == rows


def test_a_stop_string_is_found_across_passes_and_cuts_tokens_and_text(tmp_path):
    from specplan.runtime.job import Job
    from specplan.runtime.jobio import JobRow

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir(tmp_path / "tok")))
    rows = [JobRow("s", (2,), None, ("cat sat",)), JobRow("n", (2,), 3)]
    written = []

    class Writer:
        def write(self, rec):
            written.append(rec)

    job = Job(rows, [0, 1], str(tmp_path / "d.jsonl"), Writer(), tok, gen_len=8)
    assert job.limits == [8, 3]
    assert not job.stop(0, [4, 5])  # "the cat": not yet
    assert job.stop(0, [4, 5, 6, 7])  # "the cat sat on": the stop spans the last check's end
    assert not job.stop(1, [4, 5, 6])  # a row without stop strings never stops
    job.finish(0, [4, 5, 6, 7], "stop")
    assert written[0]["token_ids"] == [4, 5, 6] and written[0]["text"] == "the "
    with pytest.raises(InputError, match="max_tokens: 9 is more than the plan's gen_len 8"):
        Job([JobRow("x", (2,), 9)], [0], str(tmp_path / "d.jsonl"), Writer(), tok, gen_len=8)
