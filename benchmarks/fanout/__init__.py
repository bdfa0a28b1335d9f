"""Fan-out benchmark harness (issue 8): the gateway side by side with baselines.

`python -m benchmarks.fanout run` runs the standard set; `--smoke` a 20-second version.
See benchmarks/README-fanout.md.
"""
