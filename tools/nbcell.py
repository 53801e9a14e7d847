"""Authoring aid: print or replace one notebook cell's source, found by a unique substring.

Usage: python tools/nbcell.py get nbs/06_evaluation.ipynb "def label_logliks" > cell.py
       python tools/nbcell.py set nbs/06_evaluation.ipynb "def label_logliks" cell.py
"""
import sys, nbformat

def find(nb, needle):
    hits = [i for i, c in enumerate(nb.cells) if needle in c.source]
    if len(hits) != 1: raise SystemExit(f"{needle!r}: expected one cell, found {len(hits)}")
    return hits[0]

if __name__ == "__main__":
    cmd, path, needle = sys.argv[1:4]
    nb = nbformat.read(path, as_version=4); i = find(nb, needle)
    if cmd == "get": print(nb.cells[i].source)
    elif cmd == "set":
        nb.cells[i].source = open(sys.argv[4]).read().rstrip("\n"); nbformat.write(nb, path)
    else: raise SystemExit(f"unknown command {cmd!r}: expected get or set")
