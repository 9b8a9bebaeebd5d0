import subprocess
import sys

import pytest

from pipelines.stage_store import Progress, StageStore, chunked, stage_key

from .conftest import REPO


def rows(a, b):
    return [{"query_id": f"q{i}", "v": i} for i in range(a, b)]


def test_commit_read_and_resume(tmp_path):
    s = StageStore(tmp_path / "st")
    s.commit(rows(0, 3))
    s.commit(rows(3, 5))
    assert s.count() == 5 and s.done_ids() == {f"q{i}" for i in range(5)}
    again = StageStore(tmp_path / "st")  # a new run continues the numbering, never overwrites a part
    again.commit(rows(5, 6))
    assert len(again.parts()) == 3 and again.count() == 6
    assert not again.done
    again.finish(stage="x")
    assert StageStore(tmp_path / "st").done


def test_stale_temporary_parts_are_removed(tmp_path):
    s = StageStore(tmp_path / "st")
    s.commit(rows(0, 2))
    (tmp_path / "st" / ".tmp-123-part-00001.parquet").write_bytes(b"half a file")
    s2 = StageStore(tmp_path / "st")
    assert s2.count() == 2 and not list((tmp_path / "st").glob(".tmp-*"))


def test_sigkill_mid_stage_loses_only_the_chunk_in_flight(tmp_path):
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from pipelines.stage_store import StageStore
s = StageStore({str(tmp_path / 'st')!r})
for k in range(10):
    s.commit([{{"query_id": f"q{{k}}-{{i}}", "v": i}} for i in range(4)])
    if k == 2:
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    s = StageStore(tmp_path / "st")
    assert s.count() == 12 and len(s.done_ids()) == 12  # three whole chunks, nothing partial, no duplicates


def test_stage_key_depends_on_content():
    assert stage_key("a", {"x": 1}) == stage_key("a", {"x": 1})
    assert stage_key("a", {"x": 1}) != stage_key("a", {"x": 2})


def test_chunked_and_progress():
    assert [len(c) for c in chunked(iter(range(7)), 3)] == [3, 3, 1]
    lines = []
    p = Progress("gen", total=10, already=4, emit=lines.append)
    p.advance(3)
    assert lines[-1].startswith("[gen] 7/10 rows (70%)") and "ETA" in lines[-1]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_counts_tokens_and_beats_when_rows_are_slow():
    clock, lines = _Clock(), []
    p = Progress("gen", total=100, emit=lines.append, interval_s=30, clock=clock)
    clock.t = 10
    p.observe(4, tokens=400)
    p.tick()
    assert lines == []  # nothing due yet
    clock.t = 31
    p.tick()
    assert lines[-1].startswith("[gen] 4/100 rows (4%), 400 new tokens, 12.9 tokens/s") and lines[-1].endswith("31s")
    clock.t = 40
    p.tick()
    assert len(lines) == 1  # the heartbeat waits a whole interval after the last line


def test_progress_shows_the_prompt_tokens_read_where_rows_decode_none():
    """A judge's rows are one-token verdicts: their prompts are the work the line reports."""
    clock, lines = _Clock(), []
    p = Progress("judge", total=100, emit=lines.append, clock=clock)
    clock.t = 20
    p.advance(10, tokens=0, prompt_tokens=5000)
    assert lines[-1].startswith("[judge] 10/100 rows (10%), 0 new tokens, 0.0 tokens/s, 5000 prompt tokens (250/s), 0.50 rows/s")
    q = Progress("gen", total=10, emit=lines.append, clock=clock)
    clock.t = 30
    q.advance(1, tokens=3)
    assert "prompt tokens" not in lines[-1]  # not counted (rows through Ray Data): not shown as zero


def test_progress_warns_once_when_tokens_per_second_are_below_the_floor():
    clock, lines = _Clock(), []
    p = Progress("gen", total=100, emit=lines.append, slow_tokens_per_s=30, warmup_s=60, clock=clock)
    clock.t = 20
    p.advance(10, tokens=200)  # 10 tok/s, but inside the warm-up: no verdict yet
    assert not any("WARNING" in ln for ln in lines)
    clock.t = 100
    p.advance(10, tokens=800)  # 10 tok/s after the warm-up
    clock.t = 130
    p.advance(10, tokens=100)
    warnings = [ln for ln in lines if "WARNING" in ln]
    assert len(warnings) == 1 and "10.0 tokens/s is below the 30" in warnings[0]


def test_progress_judges_the_rate_only_once_the_rows_in_flight_came_back():
    """Rows of many answers each: the first to come back carry a fraction of the tokens the engine decoded."""
    clock, lines = _Clock(), []
    p = Progress("gen", total=100, emit=lines.append, slow_tokens_per_s=30, warmup_s=60, in_flight=16, clock=clock)
    clock.t = 60
    p.advance(15, tokens=600)  # 10 tok/s counted with one row of the window still out: no verdict
    assert not any("WARNING" in ln for ln in lines)
    clock.t = 90
    p.advance(1, tokens=100)  # the window came back, still at 7.8 tok/s: now it is slow
    assert [ln for ln in lines if "WARNING" in ln] == ["[gen] WARNING: 7.8 tokens/s is below the 30 this machine should "
                                                       "reach (a bf16 engine on a CPU without AVX512-BF16/AMX, or the "
                                                       "cores busy elsewhere?)"]
    # a stage with fewer rows left than the window is judged once all of them came back
    clock.t, small = 0, []
    p = Progress("gen", total=10, already=7, emit=small.append, slow_tokens_per_s=30, warmup_s=60, in_flight=16,
                 clock=clock)
    clock.t = 60
    p.advance(2, tokens=60)
    assert not any("WARNING" in ln for ln in small)
    clock.t = 90
    p.advance(1, tokens=30)  # the last of the 3: 1 tok/s
    assert sum("WARNING: 1.0 tokens/s" in ln for ln in small) == 1


def test_progress_does_not_warn_at_a_healthy_rate():
    clock, lines = _Clock(), []
    p = Progress("gen", total=100, emit=lines.append, slow_tokens_per_s=30, warmup_s=60, clock=clock)
    clock.t = 100
    p.advance(50, tokens=8000)
    assert not any("WARNING" in ln for ln in lines)


def test_heartbeat_thread_writes_lines_while_the_block_waits():
    import time

    lines = []
    p = Progress("gen", total=10, emit=lines.append, interval_s=0.05)
    with p.heartbeat():
        time.sleep(0.3)  # the beat checks every min(5 s, interval_s)
    assert lines and lines[0].startswith("[gen] 0/10 rows")


def test_live_bar_moves_with_each_row_and_keeps_the_lines(capsys):
    p = Progress("gen", total=10, already=2, interval_s=3600, live=True)
    with p.heartbeat():
        p.observe(3, tokens=30)
        assert p._bar.n == 5 and "30 tokens" in p._bar.postfix
        p.line()
    err = capsys.readouterr()
    assert "[gen] 5/10 rows (50%), 30 new tokens" in err.out + err.err


def test_live_bar_shows_the_prompt_tokens_of_rows_that_decode_none():
    p = Progress("judge", total=10, interval_s=3600, live=True)
    with p.heartbeat():
        p.observe(3, tokens=0)
        assert "prompt" not in p._bar.postfix  # none counted: not shown as zero
        p.observe(2, tokens=0, prompt_tokens=400)
        assert p._bar.n == 5 and p._bar.postfix.startswith("0 tokens, ") and p._bar.postfix.endswith(", 400 prompt tokens")


def test_a_store_written_by_another_version_is_a_clear_error(tmp_path):
    from pipelines.stage_store import StageSchemaError

    old = StageStore(tmp_path / "st")
    old.commit([{"query_id": "a", "response": "x", "tokens": 3}])
    resumed = StageStore(tmp_path / "st")
    with pytest.raises(StageSchemaError, match=r"missing \['tokens'\]; new \['completion_tokens'\].*another version"):
        resumed.commit([{"query_id": "b", "response": "y", "completion_tokens": 3}])
    with pytest.raises(StageSchemaError, match="tokens: number vs string"):
        resumed.commit([{"query_id": "b", "response": "y", "tokens": "3"}])
    resumed.commit([{"query_id": "b", "response": None, "tokens": 4.5}])  # all-None, or int then float: no clash
    assert [r["query_id"] for r in StageStore(tmp_path / "st").read()] == ["a", "b"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"query_id": "c", "other": 1}]), tmp_path / "st" / "part-00009.parquet")
    with pytest.raises(StageSchemaError, match="part-00009.parquet"):
        StageStore(tmp_path / "st").read()


def test_live_bar_lines_are_recorded_in_the_runs_progress_file(tmp_path):
    import json

    from pipelines.progress_log import recording

    with recording(tmp_path / "progress.jsonl"):
        p = Progress("gen", total=4, interval_s=3600, live=True)
        with p.heartbeat():
            p.advance(2, tokens=10)
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events] == ["gen"] and events[0]["message"].startswith("2/4 rows")


def test_a_disk_that_refuses_a_part_loses_nothing_committed_and_the_next_run_resumes(tmp_path):
    """A real write failure in a real process: the OS refuses files over RLIMIT_FSIZE (EFBIG, as a full disk
    refuses with ENOSPC). The stage fails with an error naming the store and what is kept; the parts committed
    before stay whole, no temporary file is left, and a later process resumes after them."""
    import subprocess
    import sys

    from pipelines.stage_store import StageStore

    from .conftest import REPO

    code = f"""
import random, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
from pipelines.stage_store import StageStore, StageWriteError
store = StageStore({str(tmp_path / 'st')!r})
store.commit([{{"query_id": f"q{{i}}", "text": "short"}} for i in range(3)])
try:  # random text: Parquet would compress a repeated one below the limit
    store.commit([{{"query_id": f"big{{i}}", "text": random.Random(i).randbytes(8000).hex()}} for i in range(4)])
except StageWriteError as e:
    print(e, flush=True)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "could not write 4 rows as part-00001.parquet" in proc.stdout and "1 part(s) committed before are intact" in proc.stdout
    store = StageStore(tmp_path / "st")
    assert [p.name for p in store.parts()] == ["part-00000.parquet"] and not list(store.root.glob(".tmp-*"))
    assert store.done_ids() == {"q0", "q1", "q2"}
    store.commit([{"query_id": f"big{i}", "text": str(i) * 20000} for i in range(4)])
    assert store.count() == 7 and len({r["query_id"] for r in store.read()}) == 7


# --- typed rows (pipelines/rows.py) -------------------------------------------------------------------------------

STORED = REPO / "tests" / "fixtures" / "stores"  # two rows of each store an embedded-think run wrote before rows were typed


@pytest.mark.parametrize("store,row", [("generate", "Trajectory"), ("judge", "Judgement"), ("review", "Review"),
                                       ("dpo-sample", "SampleSet"), ("dpo-judge", "Verdict"), ("eval-judge", "Verdict")])
def test_stores_written_before_rows_were_typed_read_back_as_their_type(tmp_path, store, row):
    import shutil

    from pipelines import rows as typed

    cls = getattr(typed, row)
    shutil.copytree(STORED / store, tmp_path / store)
    s = StageStore(tmp_path / store, row=cls)  # reopened: its parts are checked against the type at once
    got = s.read()
    assert len(got) == 2 and all(type(r) is cls for r in got)
    raw = StageStore(tmp_path / store).read()  # untyped: the dicts as stored
    assert [{k: getattr(r, k) for k in d} for r, d in zip(got, raw)] == raw  # every stored value, unchanged
    if cls is typed.Verdict:  # fields added later read as their defaults: the run resumes
        assert all(r.decided and r.reply == "" for r in got)
    # the resumed stage appends in the type's schema, and both parts read back alike
    s.commit([got[0]])
    assert len(StageStore(tmp_path / store, row=cls).read()) == 3


def test_a_typed_store_refuses_rows_that_are_not_its_type(tmp_path):
    from pipelines.rows import Review, arrow_schema

    s = StageStore(tmp_path / "r", row=Review)
    ok = {"query_id": "q1", "review": "text", "finish_reason": "stop", "completion_tokens": 3, "sampling": "{}"}
    with pytest.raises(TypeError, match=r"Review has no field\(s\) \['surprise'\]"):
        s.commit([{**ok, "surprise": 1}])  # a postprocessor that drifted from its type
    with pytest.raises(TypeError, match="Review row 'q1'"):
        s.commit([{k: v for k, v in ok.items() if k != "sampling"}])
    with pytest.raises(TypeError, match="do not fit its schema"):
        s.commit([{**ok, "completion_tokens": "three"}])
    assert s.parts() == []  # nothing half-written
    s.commit([ok, Review("q2", "more", "length", 5, "{}")])
    assert pq_schema(s.parts()[0]) == arrow_schema(Review)
    assert StageStore(tmp_path / "r", row=Review).read() == [Review(**ok), Review("q2", "more", "length", 5, "{}")]
    with pytest.raises(TypeError, match="holds Review rows, not Verdict"):
        StageStore(tmp_path / "r", row=Review).of(__import__("pipelines.rows").rows.Verdict)


def test_reopening_a_store_another_version_wrote_fails_before_anything_is_sent(tmp_path):
    """A part whose columns do not fit the type (a field without a default missing, an unknown column, another
    kind of value) is refused when the store is opened, with the directory and the columns named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.rows import Review
    from pipelines.stage_store import StageSchemaError

    for name, table in {
        "missing": pa.table({"query_id": ["q"], "review": ["t"], "finish_reason": ["stop"], "completion_tokens": [1]}),
        "unknown": pa.table({"query_id": ["q"], "review": ["t"], "finish_reason": ["stop"], "completion_tokens": [1],
                             "sampling": ["{}"], "verdict": [True]}),
        "kind": pa.table({"query_id": ["q"], "review": [1.5], "finish_reason": ["stop"], "completion_tokens": [1],
                          "sampling": ["{}"]}),
    }.items():
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part-00000.parquet")
        with pytest.raises(StageSchemaError) as e:
            StageStore(tmp_path / name, row=Review)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "another version" in msg
        assert {"missing": "missing ['sampling']", "unknown": "unknown ['verdict']",
                "kind": "review: number, Review wants string"}[name] in msg


def pq_schema(path):
    import pyarrow.parquet as pq

    return pq.read_schema(path).remove_metadata()
