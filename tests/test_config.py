import subprocess
import sys

import pytest

from safetrigger.config import ConfigError, load_config

from .conftest import REPO, write


def test_embedded_config_loads():
    cfg = load_config(REPO / "configs" / "embedded.yaml")
    assert cfg.model.source == "embedded:smollm2-135m-instruct" and cfg.serving.accelerator == "cpu"
    assert any(s.type == "jailbreak_templates" for s in cfg.data.sources)


def test_embedded_think_config_differs_only_where_the_reasoning_needs_it():
    plain, think = (load_config(REPO / "configs" / f"{n}.yaml").model_dump() for n in ("embedded", "embedded-think"))
    differ = {f"{section}.{k}" for section in plain if isinstance(plain[section], dict)
              for k in plain[section] if plain[section][k] != think[section][k]}
    differ |= {s for s in plain if not isinstance(plain[s], dict) and plain[s] != think[s]}
    assert differ == {"name", "output_dir", "model.source", "model.reasoning", "generation.max_tokens",
                      "sft_data.max_length", "dpo.max_tokens", "dpo.max_length"}
    assert think["model"]["source"] == "embedded:smollm2-135m-think" and think["model"]["reasoning"]["fallback"] == "none"


def test_overrides_by_dotted_key():
    cfg = load_config(REPO / "configs" / "embedded.yaml", {"generation.max_tokens": 7, "serving.num_replicas": 2})
    assert cfg.generation.max_tokens == 7 and cfg.serving.num_replicas == 2


def test_unknown_key_is_an_error(tmp_path):
    write(tmp_path / "c.yaml", "data: {sources: [{type: advbench, path: a.jsonl}]}\ngeneraton: {max_tokens: 3}\n")
    with pytest.raises(ConfigError, match="generaton"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("data: {sources: []}\n", "sources"),
        ("data: {sources: [{type: jailbreak_templates, path: t.jsonl}]}\n", "needs `goals`"),
        ("data: {sources: [{type: advbench, path: a}]}\nserving: {accelerator: tpu}\n", "accelerator"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("data: {sources: [\n", "not valid YAML"),
        ("data: {sources: [{type: advbench, path: a}]}\nsft: {enabled: false}\n", "dpo.enabled needs sft.enabled"),
        ("data: {dpo_fraction: 0, sources: [{type: advbench, path: a}]}\n", "needs data.dpo_fraction > 0"),
        ("data: {sources: [{type: advbench, path: a}]}\ndpo: {judge: {type: deployment}}\n", "deployment judge needs"),
        ("data: {sources: [{type: advbench, path: a}]}\ndpo: {w_a: 0.1}\n", "w_a > w_b > w_c"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {candidates: 3, temperature: 0}\n", "greedy candidates"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {candidates: 9}\n", "candidates"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {answer_opener: I can't}\n", "needs review.mode structured"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {mode: structured, answer_opener: '<safe>no'}\n",
         "plain text"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {mode: structured, answer_opener: ''}\n", "answer_opener"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {verdict_word: 'No,'}\n", "verdict_word needs review.mode structured"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {mode: structured, verdict_word: \"No,\\nYes\"}\n", "newlines"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {mode: structured, verdict_word: '</safe>'}\n", "plain text"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {select_judges: [{name: a, type: refusal}, {name: a}]}\n",
         "select_judges names repeat"),
        ("data: {sources: [{type: advbench, path: a}]}\nreview: {select_judges: [{format: xstest}]}\n", "format xstest"),
        ("data: {sources: [{type: advbench, path: a}]}\nguards: [{name: g, model: {source: x}}, {name: g, model: {source: y}}]\n",
         "names must be distinct"),
        ("data: {sources: [{type: advbench, path: a}]}\nguards: [{name: policy, model: {source: x}}]\n", "differ from serving.app_name"),
        ("data: {sources: [{type: advbench, path: a}]}\nguards: [{name: g, model: {source: lg}}]\n"
         "eval: {judges: [{name: refusal, type: refusal}, {name: j, type: deployment, app_name: g, model_id: g, tokenizer: other}]}\n",
         r"eval.judges\[1\]: a judge of guard 'g' needs model_id 'g' and tokenizer 'lg'"),
    ],
)
def test_invalid_configs(tmp_path, text, needle):
    write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "c.yaml")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    write(tmp_path / "c.yaml", "data: {sources: []}\n")
    out = subprocess.run([sys.executable, "-m", "apps.cli", "run", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "invalid config" in out.stderr and "Traceback" not in out.stderr


def test_cli_reports_bad_data_without_traceback(tmp_path):
    write(tmp_path / "bad.jsonl", '{"goal": "a"}\n{oops\n')
    write(tmp_path / "c.yaml", f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}, sources: [{{type: advbench, path: bad.jsonl}}]}}\n")
    out = subprocess.run([sys.executable, "-m", "apps.cli", "run", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "bad.jsonl:2: not valid JSON" in out.stderr and "Traceback" not in out.stderr


def test_bad_data_is_reported_before_the_engine_stack_is_imported(tmp_path):
    """The CPU line printed at start named the engine's threads through `services.policy`, which imports vLLM and Ray
    Serve: a bad data file took ~10 s to report on 2 cores, about 2 s without them."""
    write(tmp_path / "bad.jsonl", '{"goal": "a"}\n{oops\n')
    write(tmp_path / "c.yaml",
          f"output_dir: {tmp_path}/out\ndata: {{root: {tmp_path}, sources: [{{type: advbench, path: bad.jsonl}}]}}\n")
    code = ("import sys; from apps.cli import main; rc = main(['run', sys.argv[1]]); "
            "print(rc, [m for m in ('vllm', 'ray.serve', 'ray.serve.llm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.yaml")], capture_output=True, text=True,
                         cwd=REPO)
    assert "bad.jsonl:2: not valid JSON" in out.stderr and "[cpu]" in out.stdout, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "2 []", out.stdout


def test_serve_stops_on_ctrl_c_and_a_second_one_forces_it(tmp_path):
    """`safe-trigger serve` waits in `wait_for_stop`: Ctrl-C (SIGINT) used to do nothing within 15 s. Here a real
    process gets real signals: the first starts a slow stop, the second ends the process at once."""
    import signal
    import time

    code = ("import time; from apps.cli import wait_for_stop; "
            "n = wait_for_stop(0.05, lambda: print('ready', flush=True)); print('stopping', n, flush=True); "
            "time.sleep(60); print('done')")
    for first in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(first)
        assert proc.stdout.readline().split() == ["stopping", str(int(first))]
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT and time.monotonic() - t < 5


def test_serve_refuses_a_routed_policy_and_hosts_a_job_server(tmp_path):
    """Issue 17: `safe-trigger serve` never gives the policy's own app (no keys, no hiding) an HTTP route, and the
    local Ray it starts hosts the job server its gateway submits jobs to (every job call was a 503)."""
    from apps.cli import with_job_server

    out = subprocess.run([sys.executable, "-m", "apps.cli", "serve", str(REPO / "configs/embedded.yaml"),
                          str(REPO / "configs/gateway.yaml"), "--set", "serving.route_prefix=/"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "serving.route_prefix is '/'" in out.stderr and "Traceback" not in out.stderr
    local = load_config(REPO / "configs/embedded.yaml")
    served = with_job_server(local, "http://127.0.0.1:8299")
    assert served.ray.dashboard and served.ray.dashboard_port == 8299
    cluster = load_config(REPO / "configs/embedded.yaml", {"ray.address": "auto"})
    assert with_job_server(cluster, "http://127.0.0.1:8299") == cluster
