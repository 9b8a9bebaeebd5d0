# The two commands of the README. Both install what they need first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/safe-trigger run configs/embedded.yaml $(ARGS)

# Two phases. First every test outside the stack modules (tests/conftest.py: STACK_GROUPS; `--stack-modules=skip`) in
# UNIT_WORKERS pytest processes of one thread each: in one process they leave the second core idle. Measured at b2ad9a6
# (2-core AVX512-BF16 EPYC, those 648 tests, interleaved): 102-105 s in two processes against 125-133 s in one (pairs
# 101.9/132.7 and 105.1/125.4 s). Then the stack modules (`--stack-modules=only`).
# TEST_WORKERS=2: the second phase in two pytest processes, each running one group of stack modules, drawn so that two
# stacks side by side stay below Ray's memory limit. Measured on 2 cores / 24 GiB at 33af859: 578 tests in 1053 s that
# way (used memory peaked at 18.4 GiB) against 1052 s one after the other: the stacks are CPU-bound on 2 cores, so one
# process stays the default. At 04e3f56 the engine modules alone left about a quarter of both cores idle (per-process
# CPU sampled from /proc each second), yet the rest of the suite beside them in a second process gained nothing: 617
# tests in 966-1001 s against 997 s in one, test_stack 300 -> 362-441 s beside them. Not a matter of CPU share: with
# that process and its children at nice 19 (past the nice 15 Ray gives its workers, `RAY_worker_niceness`) it was the
# same; what slows them is not found (tests/conftest.py notes the page-clearing cost of two processes touching new
# memory at once on these VMs). `make test` runs both phases and fails if either failed.
UNIT_WORKERS ?= 2
TEST_WORKERS ?= 0
PYTEST = .venv/bin/python -m pytest -q
xdist = $(if $(filter-out 0 1,$(1)),-n $(1))
STACK_XDIST = $(if $(call xdist,$(TEST_WORKERS)),$(call xdist,$(TEST_WORKERS)) --dist loadgroup --no-loadscope-reorder)

test: setup
	@status=0; set -x; \
	$(PYTEST) --durations=5 $(call xdist,$(UNIT_WORKERS)) --stack-modules=skip tests || status=$$?; \
	$(PYTEST) --durations=15 $(STACK_XDIST) --stack-modules=only tests || status=$$?; \
	exit $$status

bench: setup
	.venv/bin/python bench/generation.py
