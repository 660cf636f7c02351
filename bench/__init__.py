"""txindex benchmarks: ``python bench/run.py [--smoke|--quick|--full] [--only NAME,...]``."""
