"""Offline throughput of nanovllm-cpp against its floor (and, with --peer, transformers' continuous batching).

    python benchmarks/throughput.py [--peer] [--json out.json] [--chart out.png]   # same as python -m nanovllm.bench
"""

import sys

from nanovllm.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
