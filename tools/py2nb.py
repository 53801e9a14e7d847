"""Authoring aid: turn a percent-format script (`# %%` code, `# %% [markdown]` prose) into a notebook.

Usage: python tools/py2nb.py draft.py nbs/05_training.ipynb
The notebook is the source of truth; the draft is scratch and is not committed.
"""
import sys, nbformat

def convert(src, dst):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        text = "\n".join(buf).strip("\n")
        if kind == "md":
            text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif text.strip(): cells.append(nbformat.v4.new_code_cell(text))
    for line in open(src).read().splitlines():
        if line.startswith("# %%"):
            flush(); kind, buf = ("md" if "[markdown]" in line else "code"), []
        else: buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    nbformat.write(nb, dst)

if __name__ == "__main__": convert(sys.argv[1], sys.argv[2])
