#!/usr/bin/env bash
# Sparse upcycling: dense_lm trained N updates, upcycled to switch_lm and hash_lm (every expert a
# copy of the dense FFN) and trained M more, against the same archs trained N+M from scratch and
# dense_lm trained N+M, at equal active FLOPs per token; verdicts over seeds.
#
#   bash scripts/reproduce/upcycling.sh [--scale tiny|mini|paper] [--dry-run] [--out DIR] [--only RUN,...]
#        [--updates N] [--force] [--list] [--data-root DIR] [--seeds 1,2,3]   (--help: every option)
# The plan, result table and claims: moe_plugin/experiments/upcycling.py; docs/upcycling.md.
EXPERIMENT=upcycling
source "$(dirname "${BASH_SOURCE[0]}")/_experiment.sh"
