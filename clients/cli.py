"""`safe-trigger` command line."""

from __future__ import annotations

import argparse
import sys

import yaml


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safe-trigger", description="Safe Trigger: self-generated <safe> alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline locally (or on the Ray cluster in ray.address)")
    run_p.add_argument("config", help="YAML run config, e.g. configs/embedded.yaml")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted key, e.g. --set generation.max_tokens=64")
    args = parser.parse_args(argv)

    from safetrigger.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _overrides(args.set))
    except ConfigError as e:
        print(f"safe-trigger: {e}", file=sys.stderr)
        return 2
    if args.command == "run":
        from pipelines.datasets import DatasetError
        from pipelines.run import run

        try:
            run(cfg)
        except DatasetError as e:
            print(f"safe-trigger: bad input data: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
