"""The run report: a tiny run's report.html holds its curves (mapping back to metrics.jsonl), the end-of-run
evaluation and the latest image panels; the command writes the same page and fails in one line."""

import base64
import json
import re
import shutil

import pytest
from tensorboard.backend.event_processing import event_accumulator

from helpers import read_metrics, tiny_overrides
from train.pretrain import main as pretrain_main
from train.report import MAX_POINTS, read_curves, report_quietly, svg_curve, thinned
from train.report.__main__ import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir):
    """A 6-step MAE run with the online monitor every 3 steps, panels at 3 and 6 and the end-of-run evaluation."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert pretrain_main([*tiny_overrides(), "train.steps=6", f"data.train={digits_dir / 'train.json'}",
                          f"data.val={digits_dir / 'val.json'}", "eval.at_end=true", "eval.every=3",
                          "eval.monitor_samples=16", "eval.probe_epochs=3", "run.image_every=3",
                          f"run.output_dir={out}"]) == 0
    return out


def charts(page: str) -> dict[str, list[tuple[float, float]]]:
    """key -> the (step, value) points each chart's polyline encodes, mapped back through its data-* ranges."""
    out = {}
    for svg in re.findall(r"<svg .*?</svg>", page):
        attrs = dict(re.findall(r'data-(\w+)="([^"]+)"', svg))
        x0, x1, y0, y1 = (float(attrs[k]) for k in ("x0", "x1", "y0", "y1"))
        left, top, width, height = (float(v) for v in re.search(
            r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg).groups())
        pixels = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg)[1].split()]
        out[attrs["key"]] = [(x0 + (x - left) / width * (x1 - x0), y1 - (y - top) / height * (y1 - y0))
                             for x, y in pixels]
    return out


def test_the_end_of_a_run_writes_its_report(run):
    page = (run / "report.html").read_text()
    rows = read_metrics(run)
    logged = {k for row in rows.values() for k in row} - {"step"}
    drawn = charts(page)
    assert {"train/loss", "train/lr", "perf/img_per_s", "data/wait_fraction", "monitor/knn_top1",
            "monitor/rankme", "monitor/feature_std"} <= logged and set(drawn) == logged
    for key in logged:
        want = [(s, rows[s][key]) for s in sorted(rows) if key in rows[s]]
        span = max(v for _, v in want) - min(v for _, v in want) or 1.0
        assert len(drawn[key]) == len(want), key
        for (step, value), (x, y) in zip(want, drawn[key], strict=True):
            assert x == pytest.approx(step, abs=0.01) and y == pytest.approx(value, abs=1e-3 * span), key
    assert len(drawn["monitor/rankme"]) == 2  # steps 3 and 6
    order = [page.index(h) for h in ("Loss and learning rate", "Throughput and data wait", "Online monitor",
                                      "<h2>Evaluation", "Latest image panels")]
    assert order == sorted(order)

    scores = json.loads((run / "eval.json").read_text())
    for metric in ("knn_top1", "linear_top1"):
        cells = re.search(rf"<tr><td>{metric}</td><td>([\d.-]+)</td><td>([\d.-]+)</td><td>([\d.-]+)</td></tr>", page)
        ours, theirs = scores["pretrained"][metric], scores["random init"][metric]
        assert [float(c) for c in cells.groups()] == pytest.approx([ours, theirs, ours - theirs], abs=0.006)

    events = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.IMAGES: 0}).Reload()
    tags = events.Tags()[event_accumulator.IMAGES]
    embedded = dict(re.findall(r'<img alt="([^"]+)" width="\d+" height="\d+" src="data:image/png;base64,([^"]+)"',
                               page))
    assert tags and set(embedded) == set(tags)
    for tag in tags:
        panels = events.Images(tag)
        assert [p.step for p in panels] == [3, 6]
        assert base64.b64decode(embedded[tag]) == panels[-1].encoded_image_string  # the latest, byte for byte
        assert f"{tag} (step 6)" in page


def test_the_command_writes_the_same_page_and_the_eval_results(run, tmp_path):
    assert main([str(run), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == (run / "report.html").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "eval").mkdir()
    (copy / "eval" / "knn_step_00000006_token.json").write_text(json.dumps(
        {"top1": 55.5, "top5": 90.25, "k": 20, "pool": "token", "per_class": [1, 2]}))
    assert main([str(copy)]) == 0
    page = (copy / "report.html").read_text()
    section = page[page.index("<h3>eval/knn_step_00000006_token.json"):]
    for field, cell in (("top1", "55.5"), ("top5", "90.25"), ("k", "20"), ("pool", "token")):
        assert f"<tr><td>{field}</td><td>{cell}</td></tr>" in section
    assert "per_class" not in section


def test_errors_are_one_line_and_never_fail_a_run(tmp_path, capsys, caplog):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl: no such file" in err and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo\n')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'}:2: not a metrics row" in err and err.count("\n") == 1
    with caplog.at_level("INFO", logger="train"):
        assert report_quietly(tmp_path) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "run report not written" in caplog.text
    assert not (tmp_path / "report.html").exists()


def test_curves_keep_a_resumed_steps_last_value_and_drop_non_finite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "a": 1.0, "b": "text"}, {"step": 2, "a": 5.0}, {"step": 2, "a": 2.0, "c": float("nan")},
        {"step": 3, "a": float("inf"), "d": 7.0}]))
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves == {"a": [(1, 1.0), (2, 2.0)], "d": [(3, 7.0)]}
    assert "<circle" in svg_curve("d", curves["d"]) and "<polyline" in svg_curve("a", curves["a"])
    points = [(s, float(s)) for s in range(4001)]
    kept = thinned(points)
    assert len(kept) <= MAX_POINTS + 1 and kept[0] == points[0] and kept[-1] == points[-1]


def test_a_failed_run_gets_its_report_and_a_report_error_is_one_warning(tmp_path, digits_dir, monkeypatch, caplog):
    def diverging(cfg, build_method):  # the engine's NaN guard, after logging a step
        cfg.output_dir.mkdir(parents=True)
        rows = [{"step": 1, "train/loss": 3.5}, {"step": 2, "train/loss": 2.5}]
        (cfg.output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        raise FloatingPointError("non-finite loss at step 2")

    monkeypatch.setattr("train.pretrain.train", diverging)
    argv = [*tiny_overrides(), "train.steps=2", f"data.train={digits_dir / 'train.json'}"]
    assert pretrain_main([*argv, f"run.output_dir={tmp_path / 'a'}"]) == 1
    (x1, y1), (x2, y2) = charts((tmp_path / "a" / "report.html").read_text())["train/loss"]
    assert [x1, y1, x2, y2] == pytest.approx([1, 3.5, 2, 2.5], abs=0.01)

    def broken(run_dir, out=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr("train.report.write_report", broken)
    caplog.clear()
    assert pretrain_main([*argv, f"run.output_dir={tmp_path / 'b'}"]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "run report not written: RuntimeError: disk full"]
