# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

# TEST_WORKERS=2: two pytest processes, each running one group of stack modules (tests/conftest.py: STACK_GROUPS)
# and the other tests wherever one is free, drawn so that two stacks side by side stay below Ray's memory limit.
# Measured on 2 cores / 24 GiB at 33af859: 578 tests in 1053 s that way (used memory peaked at 18.4 GiB) against
# 1052 s one after the other: the suite is CPU-bound on 2 cores, so one process stays the default. At 04e3f56 the
# engine modules alone left about a quarter of both cores idle (per-process CPU sampled from /proc each second), yet
# the rest of the suite beside them in a second process gained nothing: 617 tests in 966-1001 s against 997 s in one,
# test_stack 300 -> 362-441 s beside them. Not a matter of CPU share: with that process and its children at nice 19
# (past the nice 15 Ray gives its workers, `RAY_worker_niceness`) it was the same; what slows them is not found
# (tests/conftest.py notes the page-clearing cost of two processes touching new memory at once on these VMs).
TEST_WORKERS ?= 0

test: setup
	.venv/bin/python -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) tests

bench: setup
	.venv/bin/python bench/generation.py
