import io
import os
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from ktransfer.analysis import analyze_predictions
from ktransfer.cli import main
from ktransfer.extras import MissingExtraError
from ktransfer.report import build_report
from ktransfer.report.data import load, per_student, success_rates
from ktransfer.report.figures import gap_bins
from ktransfer.results import append_record

# Δ per (method, student, teacher); gain and loss are derived so that Δ = gain − loss holds.
DELTAS = {
    "kl": {"zoo:s1": {"zoo:t1": 1.0, "zoo:t2": -2.0}, "zoo:s2": {"zoo:t1": -1.0, "zoo:t2": -1.0}, "zoo:s3": {"zoo:t1": 0.5, "zoo:t2": 0.5}},
    "kl_dp": {"zoo:s1": {"zoo:t1": 1.0, "zoo:t2": 1.0}, "zoo:s2": {"zoo:t1": 0.5, "zoo:t2": -0.5}, "zoo:s3": {"zoo:t1": 2.0, "zoo:t2": 1.0}},
}
ACCURACY = {"zoo:s1": 80.0, "zoo:s2": 85.0, "zoo:s3": 90.0, "zoo:t1": 82.0, "zoo:t2": 88.0}
# The ensemble's Δ over the student per pair (the ceiling keys of a record).
ENSEMBLE = {("zoo:s1", "zoo:t1"): 2.0, ("zoo:s1", "zoo:t2"): 4.0, ("zoo:s2", "zoo:t1"): -1.0, ("zoo:s2", "zoo:t2"): 1.0, ("zoo:s3", "zoo:t1"): 0.0, ("zoo:s3", "zoo:t2"): 2.0}


def record(method, student, teacher, delta):
    gain = max(delta, 0.0) + 1.0
    pos_before = 6.0
    return {
        "student": student, "teacher": teacher, "method": method, "acc_before": ACCURACY[student], "acc_after": ACCURACY[student] + delta,
        "teacher_acc": ACCURACY[teacher], "delta": delta, "knowledge_gain": gain, "knowledge_loss": gain - delta,
        "pos_flips_before": pos_before, "pos_flips_after": pos_before - gain / 2, "neg_flips_before": 4.0, "neg_flips_after": 4.1,
        "delta_pos_flips": -gain / 2, "delta_neg_flips": 0.1, "epochs": 2, "lr": 0.001, "seed": 0, "n_eval": 2000, "seconds": 1.0,
        "hparams": {}, "history": [{"epoch": 1, "delta": delta / 2, "knowledge_gain": gain / 2, "knowledge_loss": gain / 2 - delta / 2}, {"epoch": 2, "delta": delta, "knowledge_gain": gain, "knowledge_loss": gain - delta}],
    }


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "results"
    for method, students in DELTAS.items():
        for student, teachers in students.items():
            for teacher, delta in teachers.items():
                append_record(folder / "results.jsonl", {**record(method, student, teacher, delta), "ensemble_delta": ENSEMBLE[(student, teacher)]})
    # A sequential multi-teacher run, in the shape ktransfer.multi writes (read tolerantly).
    sequential = {**record("kl_dp", "zoo:s1", "zoo:t1", 1.25), "strategy": "sequential", "teachers": ["zoo:t1", "zoo:t2"], "history": None,
                  "stages": [{"teacher": "zoo:t1", "history": [{"epoch": 1, "delta": 0.5, "knowledge_gain": 1, "knowledge_loss": 0.5}]},
                             {"teacher": "zoo:t2", "history": [{"epoch": 1, "delta": 1.25, "knowledge_gain": 2, "knowledge_loss": 0.75}]}]}
    append_record(folder / "results.jsonl", sequential)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    predictions = {name: np.where(rng.random(300) < ACCURACY[name] / 100, labels, rng.integers(0, 4, 300)) for name in ACCURACY}
    analyze_predictions(labels, predictions, ["cat", "dog", "ship", "frog"]).save(folder / "complementarity.json")
    (folder / "zoo.json").write_text('[{"name": "zoo:s1", "family": "cnn", "parameters": 1234, "accuracy": 80.0}]')
    return folder


def test_success_rates_and_per_student_numbers_by_hand(folder):
    data = load(folder)
    assert len(data.records) == 12 and len(data.multi_teacher) == 1
    rates = success_rates(data.records)
    assert rates["kl"] == {"zoo:s1": 50.0, "zoo:s2": 0.0, "zoo:s3": 100.0}
    assert rates["kl_dp"] == {"zoo:s1": 100.0, "zoo:s2": 50.0, "zoo:s3": 100.0}
    s1 = next(row for row in per_student(data) if row["student"] == "zoo:s1")
    mean, std = s1["methods"]["kl"]["delta"]
    assert mean == pytest.approx(-0.5) and std == pytest.approx(statistics.stdev([1.0, -2.0]))
    assert s1["methods"]["kl"]["delta_pos_flips"][0] == pytest.approx(-(2.0 + 1.0) / 2 / 2)  # gains 2 and 1, halved


def test_gap_bins_take_the_mean_of_each_bins_best_quarter():
    bins = gap_bins([0, 1, 2, 3, 4, 10], [1.0, -1.0, 3.0, 0.0, 2.0, -4.0], bins=2)
    # edges 0, 5, 10: the first bin holds five runs, its best quarter is ceil(5/4) = 2 runs (3 and 2)
    assert [(b["count"], b["top25_mean"]) for b in bins] == [(5, 2.5), (1, -4.0)]


class Cells(HTMLParser):
    """Text of each table's cells, by table id."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.cell = {}, None, None
        self.attributes = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.attributes = attrs
        if tag == "table":
            self.current = attrs.get("id")
            self.tables[self.current] = []
        elif tag == "tr" and self.current is not None:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.current][-1].append(self.cell.strip())
            self.cell = None
        elif tag == "table":
            self.current = None


def parse(html_text: str) -> Cells:
    parser = Cells()
    parser.feed(html_text)
    return parser


def test_report_is_self_contained_with_figures_beside_it(folder):
    result = build_report(folder)
    html_text = result.html.read_text()
    names = sorted(p.name for p in result.figures)
    assert names == sorted(["success_rate.png", "gain_vs_loss.png", "delta_vs_gap.png", "delta_vs_ceiling.png", "over_epochs.png", "complementarity.png", "per_class.png"])
    for path in result.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html_text.count('src="data:image/png;base64,') == len(result.figures)
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text
    tables = parse(html_text).tables
    success = {row[0]: row for row in tables["success-table"][1:]}
    assert success["kl"][1:6] == ["3", "50.0", "50.0", "0–100", "3/6"]
    assert success["kl_dp"][1:6] == ["3", "100.0", "83.3", "50–100", "5/6"]
    assert success["kl"][-1] == "2,000"  # every table carries n_eval
    students = {row[0]: row for row in tables["student-table"][1:]}
    assert students["s1"][2] == "-0.50 ± 2.12" and students["s3"][6] == "+1.50 ± 0.71"
    multi = tables["multi-teacher-table"][1]
    assert multi[:5] == ["sequential", "kl_dp", "s1", "t1, t2", "2"] and multi[7] == "+1.25"
    assert multi[10:12] == ["+1.00", "+1.00"]  # the single-teacher kl_dp runs of s1 from t1 and t2
    assert len(tables["class-table"]) == 1 + 5 * 4  # every ordered pair of five models
    # Capture = Δ ÷ ensemble Δ where ensemble Δ > 0: kl -1.0, -0.5, 0.25, 0.5 (median -12.5); kl_dp -0.5, 0.25, 0.5, 0.5 (median 37.5)
    ceiling = {row[0]: row for row in tables["ceiling-table"][1:]}
    assert ceiling["kl"][1:6] == ["6", "+1.33", "4", "-12", "-100 to 50"]
    assert ceiling["kl_dp"][1:6] == ["6", "+1.33", "4", "38", "-50 to 50"]


def test_report_of_a_folder_with_results_only(tmp_path):
    folder = tmp_path / "bare"
    append_record(folder / "results.jsonl", {**record("kl", "zoo:s1", "zoo:t1", 1.0), "history": []})
    result = build_report(folder, tmp_path / "out")
    assert result.html == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in result.figures) == ["delta_vs_gap.png", "gain_vs_loss.png", "success_rate.png"]  # no ceiling keys: no ceiling figure


def test_missing_matplotlib_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'ktransfer\[report\]'"):
        build_report(folder)
    from rich.console import Console

    from ktransfer.demo import write_report

    output = io.StringIO()
    write_report(folder, Console(file=output, width=200))
    assert "pip install 'ktransfer[report]'" in output.getvalue()


def test_report_command_errors_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "Error:" in result.output and "neither a study" in result.output


# ---------------------------------------------------------------- rendering in a real browser

CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});
</script></body>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "headless Chromium is needed to check that the report renders; install Debian's chromium package (scripts/setup.sh --test does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def rendered_dom(browser: str, page, profile) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    done = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_renders_in_headless_chromium(small_fashion_mnist, tiny_zoo, tmp_path):
    browser = chromium()
    from ktransfer.study import Study, StudyConfig, load_records

    config = {"name": "render", "students": ["zoo:mlp", "zoo:cnn"], "methods": ["kl", "kl_dp"], "epochs": 2, "lr": 0.01, "batch_size": 64,
              "data": {"source": "fashion-mnist", "dir": str(small_fashion_mnist), "transfer_size": 100, "eval_size": 100}}
    study = Study(StudyConfig.from_dict(config), tmp_path / "render")
    study.run(log=lambda line: None)
    result = CliRunner().invoke(main, ["report", str(study.folder)])
    assert result.exit_code == 0, result.output
    page = study.folder / "report.html"
    assert "4 runs and 4 control runs; methods: kl, kl_dp; 2 students" in page.read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK_IMAGES))
    dom = parse(rendered_dom(browser, checked, tmp_path / "profile"))
    assert dom.attributes.get("data-images") == "7/7"  # the Δ-against-ceiling figure too: study records carry the ceiling keys
    # The tables as the browser built them hold the study's own numbers: with one teacher per student, the
    # per-student mean Δ is that run's Δ.
    everything = load_records(study.folder)
    records = [r for r in everything if not r["control"]]
    students = {row[0]: row for row in dom.tables["student-table"][1:]}
    for r in records:
        column = 2 if r["method"] == "kl" else 6
        assert students[r["student"].removeprefix("zoo:")][column].startswith(f"{r['delta']:+.2f} ±")
        assert students[r["student"].removeprefix("zoo:")][-1] == "100"
    positive = {m: sum(1 for r in records if r["method"] == m and r["delta"] > 0) for m in ("kl", "kl_dp")}
    success = {row[0]: row for row in dom.tables["success-table"][1:]}
    assert success["kl"][5] == f"{positive['kl']}/2" and success["kl_dp"][5] == f"{positive['kl_dp']}/2"
    # The controls (ce and self, by default in a study) have a table of their own with their mean Δ.
    controls = {row[0]: row for row in dom.tables["controls-table"][1:]}
    for kind in ("ce", "self"):
        deltas = [r["delta"] for r in everything if r["control"] and r["method"] == kind]
        assert len(deltas) == 2 and controls[kind][3] == f"{sum(deltas) / 2:+.2f}"
    assert {row[0] for row in dom.tables["significance-table"][1:]} == {"kl", "kl_dp"}
    ceiling = {row[0]: row for row in dom.tables["ceiling-table"][1:]}
    for method in ("kl", "kl_dp"):
        mine = [r for r in records if r["method"] == method]
        assert ceiling[method][1] == "2" and ceiling[method][2] == f"{sum(r['ensemble_delta'] for r in mine) / 2:+.2f}"
    # A page with a broken image is caught by the same check.
    broken = tmp_path / "broken.html"
    broken.write_text(checked.read_text().replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    assert parse(rendered_dom(browser, broken, tmp_path / "profile")).attributes.get("data-images") == "6/7"


def test_report_shows_predicted_against_realised_delta(folder):
    import json

    scout = {"method": "kl", "evaluation": {"loso": {"spearman": 0.5, "low": 0.1, "high": 0.8, "p_value": 0.01},
                                            "lomo": {"spearman": 0.4, "low": 0.05, "high": 0.7, "p_value": 0.02}},
             "pairs": [{"student": "zoo:s1", "teacher": "zoo:t1", "predicted_lomo": 0.625, "predicted_loso": 0.75, "predicted": 0.5, "low": -0.25, "high": 1.25, "delta": 1.0, "noise": 0.2, "test_delta": None}]}
    (folder / "scout.json").write_text(json.dumps(scout))
    page = build_report(folder).html.read_text()
    assert 'id="scout-table"' in page and "leave-one-student-out Spearman +0.50 [+0.10, +0.80]" in page
    assert "leave-one-model-out Spearman +0.40 [+0.05, +0.70]" in page and "predicted (model held out)" in page
    assert "t1 → s1" in page and "+0.62" in page and "+0.75" in page and "[-0.25, +1.25]" in page
    # a scout.json from before the leave-one-model-out split says so instead of showing a number
    del scout["evaluation"]["lomo"], scout["pairs"][0]["predicted_lomo"]
    (folder / "scout.json").write_text(json.dumps(scout))
    assert "leave-one-model-out Spearman not computed" in build_report(folder).html.read_text()
