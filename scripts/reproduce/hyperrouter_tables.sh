#!/usr/bin/env bash
# HyperRouter (Do et al. 2023): dense, SMoE, SMoE-Dropout, HyperRouter on enwik8/text8 (BPC)
# and WikiText-103 (ppl) at K=2 and K=E, and the K sweep.
#
#   bash scripts/reproduce/hyperrouter_tables.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR]   (--help: every option)
# The plan, result table and published numbers: moe_plugin/experiments/hyperrouter_tables.py.
EXPERIMENT=hyperrouter_tables
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
