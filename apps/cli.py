"""`safe-trigger` command line: run a pipeline here, or talk to a gateway (chat, jobs) and serve one.

Gateway commands read SAFE_TRIGGER_URL and SAFE_TRIGGER_API_KEY (or --url / --key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml


def _overrides_or_exit(pairs: list[str]) -> dict:
    from safetrigger.config import ConfigError, parse_overrides

    try:
        return parse_overrides(pairs)
    except ConfigError as e:
        raise SystemExit(f"safe-trigger: {e}") from None


def _client(args):
    from clients.client import Client

    if not args.key:
        raise SystemExit("safe-trigger: no API key: pass --key or set SAFE_TRIGGER_API_KEY")
    return Client(args.url, args.key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe-trigger", description="Safe Trigger: self-generated <safe> alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline locally (or on the Ray cluster in ray.address)")
    run_p.add_argument("config", help="YAML run config, e.g. configs/embedded.yaml")
    run_p.add_argument("--until", metavar="STAGE", help="run only this stage and the stages it reads, e.g. generate")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted key, e.g. --set generation.max_tokens=64")

    def remote(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", default=os.environ.get("SAFE_TRIGGER_URL", "http://127.0.0.1:8000/gw"))
        p.add_argument("--key", default=os.environ.get("SAFE_TRIGGER_API_KEY"))
        return p

    chat = remote("chat", "ask the served model")
    chat.add_argument("prompt")
    chat.add_argument("--model")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--show-safety", action="store_true", help="keep the <safe> block in the answer")
    chat.add_argument("--no-stream", action="store_true")
    submit = remote("submit", "run a pipeline config as a job on the cluster")
    submit.add_argument("config")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="follow its progress until it ends")
    remote("jobs", "your jobs, newest first")
    for name, help in (("status", "a job's status"), ("logs", "a job's logs"), ("cancel", "stop a job"),
                       ("report", "a job's evaluation report")):
        p = remote(name, help)
        p.add_argument("job_id")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        if name == "report":
            p.add_argument("--format", choices=("markdown", "json", "html"), default="markdown")
            p.add_argument("--out", help="write to this file instead of standard output")
    promote = remote("promote", "operators (an admin key): serve a job's adapter, if the gateway's gate passes it")
    promote.add_argument("job_id")
    promote.add_argument("adapter", help="e.g. st-d")
    promote.add_argument("--version", type=int, help="the job's version (default: its current one)")
    serve = sub.add_parser("serve", help="serve the policy and the gateway on this Ray cluster")
    serve.add_argument("config", help="run config: the policy to serve (model, serving)")
    serve.add_argument("gateway", help="gateway config (keys, limits, artifact roots)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run config value")
    for name, help in (("runs", "main-job runs in the tracking store, with headline metrics"),
                       ("compare", "two runs' metrics side by side, with intervals and B - A")):
        p = sub.add_parser(name, help=help)
        p.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db"),
                       help="tracking store (default: the embedded runs' own, runs/mlflow.db)")
        p.add_argument("--experiment", default="safe-trigger")
        if name == "compare":
            p.add_argument("a", help="run id (or its start) or run name")
            p.add_argument("b")
    keygen = sub.add_parser("keygen", help="make an API key: prints the key once and its keys-file entry")
    keygen.add_argument("id")
    keygen.add_argument("--scopes", default="inference", help="comma-separated: inference,jobs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "keygen":
        from services.gateway.auth import hash_key, new_key

        key = new_key()
        print(f"key (shown once): {key}", file=sys.stderr)
        print(yaml.safe_dump([{"id": args.id, "sha256": hash_key(key), "scopes": args.scopes.split(",")}]), end="")
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command in ("runs", "compare"):
        from .runs import compare_table, runs_table

        try:
            print(runs_table(args.uri, args.experiment) if args.command == "runs"
                  else compare_table(args.uri, args.experiment, args.a, args.b))
        except LookupError as e:
            print(f"safe-trigger: {e}", file=sys.stderr)
            return 1
        return 0
    from clients.client import SafeTriggerError

    try:
        return _remote(args)
    except SafeTriggerError as e:
        print(f"safe-trigger: {e.message} (HTTP {e.status})" if e.status else f"safe-trigger: {e.message}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from safetrigger.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _overrides_or_exit(args.set))
    except ConfigError as e:
        print(f"safe-trigger: {e}", file=sys.stderr)
        return 2
    from pipelines.datasets import DatasetError
    from pipelines.graph import UnknownStageError
    from pipelines.run import run
    from pipelines.stage_store import StageWriteError

    try:
        run(cfg, until=args.until)
    except UnknownStageError as e:
        print(f"safe-trigger: --until: {e}", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"safe-trigger: bad input data: {e}", file=sys.stderr)
        return 2
    except StageWriteError as e:  # a full or read-only disk: nothing committed is lost, the next run resumes
        print(f"safe-trigger: {e}", file=sys.stderr)
        return 3
    return 0


def _remote(args) -> int:
    c = _client(args)
    if args.command == "chat":
        if args.no_stream:
            r = c.chat(args.prompt, model=args.model, max_tokens=args.max_tokens, safety="visible" if args.show_safety else None)
            print(r.content)
            safety = r.safety.__dict__
        else:
            safety = {}
            for choice in c.chat_stream(args.prompt, model=args.model, max_tokens=args.max_tokens,
                                        safety="visible" if args.show_safety else None):
                print((choice.get("delta") or {}).get("content") or "", end="", flush=True)
                safety = choice.get("safety") or safety
            print()
        print(f"[safety] triggered={safety.get('triggered')} complete={safety.get('complete')}", file=sys.stderr)
        return 0
    if args.command == "submit":
        from safetrigger.config import load_config

        cfg = load_config(args.config, _overrides_or_exit(args.set))  # validated here first: a bad config never leaves
        job = c.submit(cfg.model_dump(mode="json", exclude={"output_dir"}) | {"output_dir": "run"})
        print(job)
        if args.wait:
            st = c.wait(job, on_progress=lambda s: print(f"[{s.status}] {s.stage or ''} {s.progress or ''}", file=sys.stderr))
            return 0 if st.status == "SUCCEEDED" else 1
        return 0
    if args.command == "jobs":
        for j in c.jobs():
            print(f"{j.id}  {j.status}")
    elif args.command == "status":
        print(json.dumps(c.status(args.job_id).__dict__, indent=2))
    elif args.command == "logs":
        if args.follow:
            for piece in c.follow_logs(args.job_id):
                print(piece, end="", flush=True)
        else:
            print(c.logs(args.job_id), end="")
    elif args.command == "cancel":
        print("stopped" if c.cancel(args.job_id) else "already finished")
    elif args.command == "promote":
        done = c.promote(args.job_id, args.adapter, args.version)
        print(f"promoted: {done['promoted']['model']} (job {args.job_id} v{done['promoted']['job_version']})")
        print("\n".join(f"  - {r}" for r in done["decision"]["reasons"]))
    elif args.command == "report":
        out = c.report(args.job_id, args.format)
        text = json.dumps(out, indent=2) if args.format == "json" else out
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            print(args.out)
        else:
            print(text)
    return 0


def wait_for_stop(poll_s: float = 0.5, on_ready=None) -> int:
    """Block until SIGINT or SIGTERM and return its number; a second one while the caller is stopping ends the
    process at once (exit 128 + signal). `signal.sigwait` did nothing on Ctrl-C: with SIGINT not blocked, Python's
    own handler took the signal and sigwait never returned."""
    import os
    import signal
    import threading

    got: list[int] = []
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # the second Ctrl-C: the user wants out now
        got.append(signum)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    if on_ready is not None:  # said once the handlers are in place, so a Ctrl-C after it is always caught
        on_ready()
    while not stop.wait(poll_s):
        pass
    return got[0]


def _stop_serving() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def with_job_server(cfg, dashboard_url: str):
    """A local Ray started by `serve` hosts the job server the gateway's jobs API submits to, on the port its
    `ray_dashboard_url` names (bound to 127.0.0.1); a cluster's (`ray.address`) is left as it is."""
    from urllib.parse import urlparse

    if cfg.ray.address:
        return cfg
    port = urlparse(dashboard_url).port or 8265
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"dashboard": True, "dashboard_port": port})})


def _serve(args) -> int:
    from pipelines.runtime import emit_precision, init_ray, precision_report, set_threads, with_adapter_root
    from safetrigger.config import load_config
    from services.policy_rules import PolicyServiceError, refuse_public_route

    cfg = with_adapter_root(load_config(args.config, _overrides_or_exit(args.set)))
    try:
        refuse_public_route(cfg)
    except PolicyServiceError as e:
        print(f"safe-trigger: {e}", file=sys.stderr)
        return 2
    from services.gateway.config import load_gateway_config
    from services.gateway.deploy import GATEWAY_PREFIX, gateway_target, pointed_at
    from services.policy import start_policy

    gw = load_gateway_config(args.gateway)
    cfg = with_job_server(cfg, gw.ray_dashboard_url)
    set_threads(cfg.torch_threads)
    emit_precision(precision_report(cfg), print)
    init_ray(cfg)
    prefix = GATEWAY_PREFIX

    def gateway_in_front(ep):
        return [gateway_target(pointed_at(gw, ep).model_copy(update={
            "adapter_root": gw.adapter_root or cfg.serving.adapter_root, "policy_model_source": cfg.model.source}),
            route_prefix=prefix)]

    ep = start_policy(cfg, beside=gateway_in_front)  # both apps start at once
    signum = wait_for_stop(on_ready=lambda: print(
        f"gateway ready at http://{cfg.serving.http_host}:{cfg.serving.http_port}{prefix} (the policy app "
        f"{ep.app_name!r} answers by handle only)",
        flush=True))
    print(f"signal {signum}: stopping the gateway, the policy and the local Ray (again to force)", flush=True)
    _stop_serving()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
