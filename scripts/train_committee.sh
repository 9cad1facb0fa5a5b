#!/usr/bin/env bash
# Train the committee bundled for tests and examples (tests/data/committee/):
# four members of the bundled water model's architecture, differing only in the
# random seed (initial weights, validation split, batch order). Run from the
# repository root; about 8 minutes on 2 CPU cores.
set -euo pipefail
out=tests/data/committee
mkdir -p "$out" /tmp/cace-committee-ckpt
train() {
    local name=$1; shift
    cace-server train --config data/water_train.toml --threads 1 \
        -o "$out/$name.safetensors" --checkpoint "/tmp/cace-committee-ckpt/$name.pt" "$@" \
        > "/tmp/cace-committee-ckpt/$name.log"
    tail -1 "/tmp/cace-committee-ckpt/$name.log"
}
train seed1 --seed 1 --epochs 25 & train seed2 --seed 2 --epochs 25; wait
train seed3 --seed 3 --epochs 25 & train seed4 --seed 4 --epochs 25; wait
