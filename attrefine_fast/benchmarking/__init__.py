"""The benchmark suite behind ``attrefine-fast bench`` and benchmarks/ (pytest-benchmark).

core: providers, cases and the interleaved timing loop. inputs: photos, segmentations, models.
op_cases / explain_cases / attack_cases: one setup function per op and per end-to-end task.
sweep: which cases each profile runs. suite: runs a profile. report / markdown: the figures.
"""
