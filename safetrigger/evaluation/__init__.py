"""How the safe-triggered model is measured against its base: judge prompt formats, metrics with intervals,
suites over per-example records, and the promotion gate. Plain Python, no Ray: the pipeline computes, the
report shows and the tests check the very same functions.
"""
