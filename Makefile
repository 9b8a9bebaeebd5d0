# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

test: setup
	.venv/bin/python -m pytest -q --durations=15 tests

bench: setup
	.venv/bin/python bench/generation.py
