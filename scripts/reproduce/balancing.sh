#!/usr/bin/env bash
# Balancing methods beyond the four papers, at equal active FLOPs per token: Switch's aux loss
# (micro- and global-batch), auxiliary-loss-free bias, Sinkhorn (S-BASE), BASE, shared + routed
# experts; load max/mean over training, % dropped, perplexity, gap to the floor, verdicts.
#
#   bash scripts/reproduce/balancing.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR] [--seeds 1,2,3]   (--help: every option)
# The plan, result table and claims: moe_plugin/experiments/balancing.py; docs/balancing.md.
EXPERIMENT=balancing
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
