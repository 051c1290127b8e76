#!/usr/bin/env bash
# SAM (Jiang et al. 2021): activated experts K vs quality, SAM vs Switch vs GShard top-2
# vs flat top-K, and the cross-device traffic SAM saves. Extra option: --equal-compute.
#
#   bash scripts/reproduce/sam_k_quality.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR]   (--help: every option)
# The plan, result table and published numbers: moe_plugin/experiments/sam_k_quality.py.
EXPERIMENT=sam_k_quality
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
