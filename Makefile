# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

# Two pytest processes, a test module at a time each, longest first (tests/conftest.py): the stack modules spend
# much of their time starting engines and workers, so two of them side by side on 2 cores took 935 s against 1183 s
# one after the other. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

bench: setup
	.venv/bin/python bench/generation.py
