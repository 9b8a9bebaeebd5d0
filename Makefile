# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

# Two pytest processes, each running one group of stack modules (tests/conftest.py: STACK_GROUPS) and the other
# tests wherever one is free; the groups are drawn so that the two stacks side by side stay below Ray's memory limit.
# TEST_WORKERS=0: one process, one test after another.
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) tests

bench: setup
	.venv/bin/python bench/generation.py
