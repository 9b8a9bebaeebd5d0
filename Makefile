# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

# TEST_WORKERS=2: two pytest processes, a test module at a time each, longest first (tests/conftest.py). Measured on
# 2 cores / 24 GiB: 950 s against 1183 s one after the other, but the machine's used memory peaked at 21.3 GB with
# two stacks side by side, near Ray's OOM-kill threshold (95%), so one process stays the default here.
TEST_WORKERS ?= 0

test: setup
	.venv/bin/python -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

bench: setup
	.venv/bin/python bench/generation.py
