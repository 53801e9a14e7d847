#!/usr/bin/env bash
# Fails when nbdev-export would change vrnx_nb/ or nbdev-clean would change nbs/ (notebooks are the source).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
state() { { git status --porcelain -- "$1"; git diff -- "$1"; git ls-files --others --exclude-standard -- "$1" | xargs -r cat; } | sha1sum; }
before=$(state vrnx_nb); $BIN/nbdev-export; after=$(state vrnx_nb)
if [ "$before" != "$after" ]; then echo "FAIL: nbdev-export changed vrnx_nb/ (the package does not match the notebooks):"; git status --short vrnx_nb; exit 1; fi
before=$(state nbs); $BIN/nbdev-clean; after=$(state nbs)
if [ "$before" != "$after" ]; then echo "FAIL: nbdev-clean changed nbs/ (commit notebooks clean):"; git status --short nbs; exit 1; fi
echo "ok: vrnx_nb/ matches nbs/, notebooks are clean"
