"""scripts/demo_curves.py draws and tabulates the curves that docs/demo.md shows, and the page's table is the data's."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo_curves.py"
DATA = ROOT / "docs" / "figures" / "demo-curves.jsonl"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e-?\d+)?")


def numbers(row: str) -> list[float]:
    return [float(n) for n in NUMBER.findall(row.replace("−", "-").split("|", 2)[-1])]


def table_rows(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_the_script_redraws_the_figure_and_the_page_holds_its_table(tmp_path):
    figure = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(SCRIPT), "plot", str(DATA), str(figure)], check=True, capture_output=True)
    assert figure.stat().st_size > 10_000
    printed = subprocess.run([sys.executable, str(SCRIPT), "table", str(DATA)], check=True, capture_output=True, text=True).stdout
    ours = [numbers(row) for row in table_rows(printed, "| pair (ens Δ) | lr |")]
    page = [numbers(row) for row in table_rows((ROOT / "docs" / "demo.md").read_text(encoding="utf-8"), "| pair (ens Δ) | lr | KL |")]
    assert len(ours) == 12 and ours == page


def test_the_page_holds_the_variants_table_of_the_search_data(tmp_path):
    data = ROOT / "docs" / "figures" / "demo-search.jsonl"
    figure = tmp_path / "variants.png"
    printed = subprocess.run([sys.executable, str(SCRIPT), "variants", str(data), "--figure", str(figure)], check=True, capture_output=True, text=True).stdout
    assert figure.stat().st_size > 10_000
    ours = [row.split("|")[1:4] + [numbers(row)] for row in table_rows(printed, "| variant |")]
    page = [row.split("|")[1:4] + [numbers(row)] for row in table_rows((ROOT / "docs" / "demo.md").read_text(encoding="utf-8"), "| variant |")]
    assert len(ours) >= 12 and ours == page
