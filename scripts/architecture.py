"""Writes the stage graph section of ARCHITECTURE.md from the declared graph (`pipelines/stages.py`), so the
drawing cannot drift from the code; `tests/test_layers.py` fails when the file is stale.

    .venv/bin/python scripts/architecture.py          # rewrite the section
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- stage-graph:begin (scripts/architecture.py) -->", "<!-- stage-graph:end -->"


def stage_graph_section() -> str:
    from pipelines.graph import mermaid
    from pipelines.stages import QUERIES, main_graph
    from safetrigger.config import load_config

    stages = main_graph(load_config(REPO / "configs" / "embedded.yaml"))
    table = ["| stage | output | reads | what |", "|---|---|---|---|"]
    table += [f"| `{s.name}` | {s.output}{f': `{s.row.__name__}`' if s.row else ''}{f' (served as `policy:{s.publish}`)' if s.publish else ''} | "
              f"{', '.join(f'`{i}`' for i in s.inputs)} | {s.doc} |" for s in stages]
    return "\n".join([BEGIN, "```mermaid", mermaid(stages, (QUERIES,)), "```", "", *table, END])


def rewrite(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + stage_graph_section() + tail


if __name__ == "__main__":
    path = REPO / "ARCHITECTURE.md"
    path.write_text(rewrite(path.read_text()))
    print(f"wrote {path}")
