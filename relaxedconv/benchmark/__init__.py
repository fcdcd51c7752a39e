"""Benchmarks of the backends (``relaxedconv bench``; see :mod:`relaxedconv.benchmark.runner`).

cases.py: the layers measured; flops.py: design.md §2 operation counts; timing.py: medians and
peak memory; layer_bench.py: one (case, dtype, backend) row; e2e.py: training-step images/s of
the §7 model; environment.py: card, versions, commit; report.py: tables, targets, JSON.
"""
