import subprocess
import sys

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
