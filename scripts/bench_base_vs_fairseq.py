#!/usr/bin/env python3
"""BASE layers, moe_plugin vs fairseq's own --base-layers: words/s and validation loss of the same
model on 2 gloo CPU ranks (moe_plugin/tools/base_vs_fairseq.py has the description and options).

  python scripts/bench_base_vs_fairseq.py --repeats 2 --markdown results/bench_base_vs_fairseq.md
"""

from moe_plugin.tools.base_vs_fairseq import main

if __name__ == "__main__":
    main()
