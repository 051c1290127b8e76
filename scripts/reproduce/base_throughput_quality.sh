#!/usr/bin/env bash
# BASE layers (Lewis et al. 2021), Table 2: training throughput of dense, top-2, Switch,
# BASE, BASE x2, BASE x3; quality at equal budget; the Table 1 routing analysis.
#
#   bash scripts/reproduce/base_throughput_quality.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR]   (--help: every option)
# The plan, result table and published numbers: moe_plugin/experiments/base_throughput_quality.py.
EXPERIMENT=base_throughput_quality
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
