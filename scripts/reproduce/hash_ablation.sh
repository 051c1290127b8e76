#!/usr/bin/env bash
# Hash layers (Roller et al. 2021): the hash-function ablation and Hash vs Switch vs BASE
# at two expert counts.
#
#   bash scripts/reproduce/hash_ablation.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR]   (--help: every option)
# The plan, result table and published numbers: moe_plugin/experiments/hash_ablation.py.
EXPERIMENT=hash_ablation
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
