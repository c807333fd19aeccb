"""gptfn's benchmark suite: ``python -m benchmarks [WORKLOAD...] [--quick] [--out DIR]``."""
