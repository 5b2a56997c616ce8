"""Execute notebooks headlessly through the installed moelab-rust kernelspec with nbclient.

Fails when a cell errors, or when a notebook's outputs lack an HTML table or an SVG chart.
Executed copies go to the directory given by --out, for reading."""

import argparse
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def rich_outputs(nb):
    """(has an HTML table, has an SVG) over every output of every code cell."""
    table = svg = False
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html = data.get("text/html", "")
            if isinstance(html, list):
                html = "".join(html)
            table = table or "<table" in html
            svg = svg or "image/svg+xml" in data or "<svg" in html
    return table, svg


def cell_times(nb):
    """Seconds from each code cell's execute request to its reply, as nbclient recorded."""
    from datetime import datetime
    times = []
    for c in nb.cells:
        ex = c.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if c.cell_type == "code" and a and b:
            t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
            times.append(round((t(b) - t(a)).total_seconds(), 1))
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--kernel", default="moelab-rust")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    failures = []
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as cwd:
            client = NotebookClient(nb, kernel_name=args.kernel, timeout=args.timeout, startup_timeout=120,
                                    resources={"metadata": {"path": cwd}})
            try:
                client.execute()
            except CellExecutionError as e:
                failures.append(f"{path}: a cell failed:\n{e}")
                print(f"FAIL {path} ({time.time() - t0:.1f} s): cell error", flush=True)
                continue
        print(f"   {path}: per-cell seconds (request to reply): {cell_times(nb)}", flush=True)
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        table, svg = rich_outputs(nb)
        problems = []
        if errors:
            problems.append(f"{len(errors)} error outputs")
        if not table:
            problems.append("no HTML table in the outputs")
        if not svg:
            problems.append("no SVG in the outputs")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            nbformat.write(nb, os.path.join(args.out, os.path.basename(path)))
        status = "FAIL" if problems else "ok"
        print(f"{status} {path} ({time.time() - t0:.1f} s){': ' + ', '.join(problems) if problems else ''}", flush=True)
        if problems:
            failures.append(f"{path}: {', '.join(problems)}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"{len(args.notebooks)} notebooks executed without errors, with tables and SVGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
