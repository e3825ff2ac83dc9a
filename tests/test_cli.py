import json
import statistics

import pytest
from click.testing import CliRunner

from ktransfer.cli import main
from ktransfer.results import REQUIRED_KEYS, read_records


def run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.mark.parametrize("command", [[], ["demo"], ["transfer"], ["methods"], ["data"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_demo_help_states_the_demos_own_defaults():
    from ktransfer import demo

    text = " ".join(run("demo", "--help").output.split())
    assert f"[default: {','.join(demo.DEFAULT_METHODS)}]" in text
    assert f"[default: {','.join(map(str, demo.DEFAULT_SEEDS))}]" in text
    assert "ktransfer.demo." not in text


def test_methods_lists_hyperparameters():
    result = run("methods")
    assert result.exit_code == 0
    for text in ("kl_dp", "temperature", "supervised", "routing", "cd_authors", "reduction"):
        assert text in result.output


def test_transfer_writes_record_and_student(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "run"
    result = run("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "kl_dp", "--epochs", "2", "--lr", "1e-3", "--out", out, "--data-dir", small_fashion_mnist, "--param", "temperature=2")
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert set(REQUIRED_KEYS) <= set(record)
    assert record["student"] == "zoo:cnn" and record["teacher"] == "zoo:mlp" and record["epochs"] == 2 and record["hparams"]["temperature"] == 2.0
    assert len(record["history"]) == 2
    assert list(out.glob("*.safetensors"))


def test_transfer_with_controls_records_them_and_compares(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "controlled"
    result = run("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "kl", "--epochs", "1", "--lr", "1e-2", "--controls", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    ce, own, transfer = read_records(out / "results.jsonl")
    assert (ce["method"], own["method"]) == ("ce", "self") and ce["control"] and own["control"] and ce["teacher"] is None
    assert ce["lr"] == own["lr"] == transfer["lr"] == 1e-2 and ce["epochs"] == transfer["epochs"] == 1
    assert transfer["delta_vs_control"] == pytest.approx(transfer["acc_after"] - ce["acc_after"])
    assert transfer["delta_vs_self"] == pytest.approx(transfer["acc_after"] - own["acc_after"])
    assert "beyond the controls" in result.output
    one_line_error(
        run("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--teacher", "zoo:vit", "--strategy", "soup", "--controls", "--out", out, "--data-dir", small_fashion_mnist),
        "--controls compares a single-teacher transfer",
    )


def test_transfer_with_the_papers_augmentation_on_fashion_mnist(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "run"
    result = run("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "kl_dp", "--epochs", "1", "--lr", "1e-3", "--augment", "paper", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert record["augment"] == "paper" and record["targets"] == "online"  # online: cached is not exact with augmentation
    assert 0 <= record["p_value"] <= 1 and record["gain_count"] - record["loss_count"] == round(record["delta"] * record["n_eval"] / 100)
    assert "(p " in result.output and "augmented" in result.output
    one_line_error(
        run("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--augment", "paper", "--targets", "cached", "--out", out, "--data-dir", small_fashion_mnist),
        "--targets: cached teacher outputs are of the un-augmented images",
    )


def test_transfer_bad_input(small_fashion_mnist, tiny_zoo, tmp_path):
    base = ["transfer", "--out", tmp_path / "x", "--data-dir", small_fashion_mnist]
    one_line_error(run(*base, "--student", "zoo:cnn", "--teacher", "zoo:nope"), "unknown zoo model 'nope'")
    one_line_error(run(*base, "--student", "cnn", "--teacher", "zoo:mlp"), "SOURCE:NAME")
    one_line_error(run(*base, "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "magic"), "unknown method 'magic'")
    one_line_error(run(*base, "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--param", "temperature=-1"), "temperature")
    one_line_error(run(*base, "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--param", "oops"), "KEY=VALUE")
    one_line_error(run(*base, "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--device", "warp"), "unknown device 'warp'")
    one_line_error(run("transfer", "--out", tmp_path / "x", "--data-dir", tmp_path / "missing", "--student", "zoo:cnn", "--teacher", "zoo:mlp"), "does not exist")


def test_demo_bad_input(small_fashion_mnist, tmp_path):
    one_line_error(run("demo", "--methods", "kl,nope", "--out", tmp_path, "--data-dir", small_fashion_mnist), "unknown method 'nope'")
    one_line_error(run("demo", "--students", "cnn,alexnet", "--out", tmp_path, "--data-dir", small_fashion_mnist), "alexnet")
    one_line_error(run("demo", "--out", tmp_path, "--data-dir", tmp_path / "missing"), "does not exist")
    one_line_error(run("demo", "--out", tmp_path, "--device", "tpu7", "--data-dir", small_fashion_mnist), "unknown device 'tpu7'")


def test_demo_end_to_end_with_controls_and_resume(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--executor", "local", "--profile", "quick", "--students", "cnn,vit", "--teachers", "cnn,vit,mlp", "--epochs", "1", "--out", out, "--data-dir", small_fashion_mnist]
    result = run(*args)
    assert result.exit_code == 0, result.output
    records = read_records(out / "results.jsonl")
    transfers = [r for r in records if not r["control"]]
    controls = [r for r in records if r["control"]]
    assert len(transfers) == 2 * 2 * 2  # 2 students x 2 other teachers x 2 methods
    assert {(r["student"], r["teacher"], r["method"]) for r in transfers} == {
        (f"zoo:{s}", f"zoo:{t}", m) for s in ("cnn", "vit") for t in ("cnn", "vit", "mlp") if s != t for m in ("kl", "kl_dp")
    }
    # one ce and one self control per student, records of their own with no teacher
    assert sorted((r["student"], r["method"]) for r in controls) == [(f"zoo:{s}", c) for s in ("cnn", "vit") for c in ("ce", "self")]
    assert all(r["teacher"] is None and r["teacher_acc"] is None for r in controls)
    for r in transfers:
        ce = next(c for c in controls if c["student"] == r["student"] and c["method"] == "ce")
        own = next(c for c in controls if c["student"] == r["student"] and c["method"] == "self")
        assert r["control_delta"] == ce["delta"] and r["self_delta"] == own["delta"]
        assert r["delta_vs_control"] == pytest.approx(r["acc_after"] - ce["acc_after"])
        assert r["delta_vs_self"] == pytest.approx(r["acc_after"] - own["acc_after"])
        # the discordant counts of the paired comparison explain the difference exactly
        assert r["delta_vs_control"] == pytest.approx(100 * (r["gain_count_vs_control"] - r["loss_count_vs_control"]) / r["n_eval"])
        assert 0 <= r["p_value"] <= 1 and 0 <= r["p_value_vs_control"] <= 1 and 0 <= r["p_value_vs_self"] <= 1
        assert r["setting"] == "paper" and r["transfer_data"] == "fashion-mnist/transfer"
    for text in ("Zoo", "Complementary knowledge", "Controls", "Per method", "success rate", "beats ce", "by chance"):
        assert text in result.output
    # Output that is not a terminal (here a test's capture; a user's log file) holds every table whole: no cell cut to "…"
    assert "…" not in result.output and "zoo: vit ready" in result.output
    assert any(line.count("│") >= 10 and "kl_dp" in line for line in result.output.splitlines())  # a per-pair row, every column in one line
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"kl", "kl_dp"} and set(summary["controls"]) == {"ce", "self"}
    # the ceiling: in every transfer record, the tables and the per-method summary
    assert all(r["ensemble_delta"] == pytest.approx(r["ensemble_acc"] - r["acc_before"]) for r in transfers)
    assert all(r["ensemble_delta"] is None and r["capture"] is None for r in controls)
    assert "ens Δ" in result.output and "median capture" in result.output
    positive = [r["delta"] / r["ensemble_delta"] for r in transfers if r["method"] == "kl" and r["ensemble_delta"] > 0]
    assert summary["methods"]["kl"]["capture_pairs"] == len(positive)
    assert positive and summary["methods"]["kl"]["median_capture"] == pytest.approx(statistics.median(positive))
    # every other method against KL+DP, head to head, in the output and the summary
    versus = summary["head_to_head"]["kl"]
    by_pair = {(r["student"], r["teacher"]): r for r in transfers if r["method"] == "kl_dp"}
    differences = [r["acc_after"] - by_pair[(r["student"], r["teacher"])]["acc_after"] for r in transfers if r["method"] == "kl"]
    assert set(summary["head_to_head"]) == {"kl"} and versus["pairs"] == 4 and versus["reference"] == "kl_dp"
    assert (versus["ahead"], versus["behind"]) == (sum(d > 0 for d in differences), sum(d < 0 for d in differences))
    assert f"kl is ahead of kl_dp in {versus['ahead']} of 4 pairs" in result.output
    zoo = json.loads((out / "zoo.json").read_text())
    assert {row["name"] for row in zoo} == {"cnn", "vit", "mlp"}
    # a second run reuses every finished run, and the file still holds each run once, comparisons included
    again = run(*args)
    assert again.exit_code == 0 and "reused 12 finished runs" in again.output
    rerun = read_records(out / "results.jsonl")
    assert len(rerun) == 12 and [r["delta_vs_control"] for r in rerun if not r["control"]] == [r["delta_vs_control"] for r in transfers]


def test_demo_new_data_setting_transfers_on_the_unseen_images(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "new"
    result = run("demo", "--executor", "local", "--setting", "new-data", "--students", "mlp", "--teachers", "cnn", "--methods", "kl_dp", "--no-controls", "--epochs", "1", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert record["setting"] == "new-data" and record["transfer_data"] == "fashion-mnist/validation" and record["n_transfer"] == 200
    assert "delta_vs_control" not in record and "Controls" not in result.output
    # For scripts, --json: one JSON object on standard output; the tables on standard error, whole, though no
    # COLUMNS says how wide a log may be (rich alone would cut them to 80 columns)
    plain = CliRunner(env={"COLUMNS": None}).invoke(main, ["demo", "--executor", "local", "--setting", "new-data", "--students", "mlp", "--teachers", "cnn", "--methods", "kl_dp", "--no-controls", "--epochs", "1", "--out", str(out), "--data-dir", str(small_fashion_mnist), "--json"])
    assert plain.exit_code == 0, plain.output
    payload = json.loads(plain.stdout)
    assert [r["delta"] for r in payload["records"]] == [record["delta"]] and payload["summary"]["kl_dp"]["pairs"] == 1
    assert "Per method" in plain.stderr and "…" not in plain.stderr
    one_line_error(run("demo", "--seeds", "0,x", "--out", out, "--data-dir", small_fashion_mnist), "seeds must be comma-separated integers")


def test_a_long_spec_makes_a_file_name_any_file_system_takes(tmp_path):
    # a student given by a long path or query once made a name (and its temporary twin) past the 255-byte limit
    from ktransfer.cli.transfer_cmd import file_name
    from ktransfer.paths import atomic_path

    spec = "pkg.models:factory?root=" + "d/" * 150
    name = file_name(f"{spec}-from-zoo:mlp-kl_dp")
    assert len(name.encode()) <= 200 and name.startswith("pkg.models_factory_root-d_d_") and name != file_name(f"{spec}x-from-zoo:mlp-kl_dp")
    assert file_name("zoo:cnn-from-zoo:mlp-kl_dp") == "zoo_cnn-from-zoo_mlp-kl_dp"  # short names as they were
    target = tmp_path / f"{name}.safetensors"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights" and [p.name for p in tmp_path.iterdir()] == [target.name]
