"""One self-contained HTML page per run (`<run>/report.html`): the logged curves as inline SVG, the end-of-run
evaluation against the random encoder as tables, and the latest TensorBoard image panels as embedded PNGs.

Sources: `metrics.jsonl` (rows of {"step", key: value}, train.monitor), `eval.json` (train.pretrain),
`eval/*.json` (train.monitor.write_results) and the image summaries under `tb/`. No plotting dependency."""

import base64
import html
import json
import logging
import math
from pathlib import Path

import yaml
from tensorboard.backend.event_processing import event_accumulator

log = logging.getLogger("train")

# sections of the curves: (title, key prefixes); keys of no listed prefix go to "Other scalars"
SECTIONS = [("Loss and learning rate", ("train/",)), ("Throughput and data wait", ("perf/", "data/")),
            ("Online monitor", ("monitor/",))]
FIRST = ("train/loss", "train/lr", "perf/img_per_s", "data/wait_fraction")  # shown first in their sections
MAX_POINTS = 1500  # longer curves are thinned to about this many points (the last one kept)
W, H, LEFT, RIGHT, TOP, BOTTOM = 360, 190, 62, 14, 10, 30  # chart size and plot margins (px)

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:.85em;color:#444}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}img{image-rendering:pixelated;border:1px solid #ccc}
svg text{font-size:10px;fill:#555}"""


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as key -> [(step, value)] in step order; a step logged again (resume) keeps its last value;
    non-numeric and non-finite values are left out."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a run directory: train.pretrain writes metrics.jsonl)")
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{number}: not a metrics row ({err})") from None
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def thinned(points: list, limit: int = MAX_POINTS) -> list:
    """Every n-th point so that at most about `limit` remain, always with the last."""
    stride = max(1, math.ceil(len(points) / limit))
    return points if stride == 1 else points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def number(value: float) -> str:
    return f"{value:.4g}"


def svg_curve(key: str, points: list[tuple[int, float]]) -> str:
    """A line chart of `points` (step, value): the y range is min..max of the values (data-y0/data-y1), the x range
    first..last step (data-x0/data-x1), so the polyline's pixels map back to the values."""
    steps, values = [s for s, _ in points], [v for _, v in points]
    x0, x1, y0, y1 = min(steps), max(steps), min(values), max(values)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.05 or 1), y1 + (abs(y1) * 0.05 or 1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def xy(step, value):
        return LEFT + (step - x0) / (x1 - x0) * pw, TOP + (y1 - value) / (y1 - y0) * ph

    drawn = [xy(s, v) for s, v in thinned(points)]
    if len(drawn) > 1:
        line = ('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="'
                + " ".join(f"{x:.2f},{y:.2f}" for x, y in drawn) + '"/>')
    else:
        line = f'<circle r="3" fill="#1f77b4" cx="{drawn[0][0]:.2f}" cy="{drawn[0][1]:.2f}"/>'
    axes = (f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>'
            f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{number(y1)}</text>'
            f'<text x="{LEFT - 4}" y="{TOP + ph}" text-anchor="end">{number(y0)}</text>'
            f'<text x="{LEFT}" y="{H - 16}">{x0}</text>'
            f'<text x="{LEFT + pw}" y="{H - 16}" text-anchor="end">{x1}</text>'
            f'<text x="{LEFT + pw / 2}" y="{H - 4}" text-anchor="middle">step</text>')
    name = html.escape(key)
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" data-key="{name}" '
            f'data-x0="{x0}" data-x1="{x1}" data-y0="{y0!r}" data-y1="{y1!r}">{axes}{line}</svg>'
            f'<figcaption><b>{name}</b>: last {number(values[-1])} at step {steps[-1]}, min {number(min(values))}, '
            f'max {number(max(values))}</figcaption></figure>')


def curve_sections(curves: dict) -> str:
    """The charts grouped by SECTIONS (empty sections left out), the rest under "Other scalars"."""
    def rank(key):
        return (FIRST.index(key) if key in FIRST else len(FIRST), key)

    placed, out = set(), []
    for title, prefixes in [*SECTIONS, ("Other scalars", ("",))]:
        keys = sorted((k for k in curves if k not in placed and k.startswith(prefixes)), key=rank)
        placed.update(keys)
        if keys:
            out.append(f"<h2>{title}</h2><div class='grid'>" + "".join(svg_curve(k, curves[k]) for k in keys)
                       + "</div>")
    return "".join(out)


def table(header: list[str], rows: list[list], fmt=number) -> str:
    def cell(value):
        return fmt(value) if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def evaluation_section(run_dir: Path) -> str:
    """eval.json (pretrained vs random init, with the difference) and every eval/*.json (its scalar fields)."""
    parts = []
    path = run_dir / "eval.json"
    if path.is_file():
        scores = json.loads(path.read_text())
        ours, theirs = scores.get("pretrained", {}), scores.get("random init", {})
        rows = [[metric, float(ours[metric]), float(theirs[metric]) if metric in theirs else "",
                 float(ours[metric] - theirs[metric]) if metric in theirs else ""] for metric in ours]
        parts.append(f"<h3>eval.json (step {scores.get('step', '?')})</h3>"
                     + table(["metric (%)", "pretrained", "random init", "difference"], rows, "{:.2f}".format))
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        rows = [[k, float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v]
                for k, v in result.items() if not isinstance(v, dict | list)]
        parts.append(f"<h3>eval/{html.escape(path.name)}</h3>" + table(["field", "value"], rows))
    return "<h2>Evaluation</h2>" + "".join(parts) if parts else ""


def latest_images(tb_dir: Path) -> dict[str, tuple[int, bytes]]:
    """tag -> (step, encoded PNG) of the latest image summary of every tag under `tb_dir`."""
    if not tb_dir.is_dir():
        return {}
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not its "directory watcher advancing" lines
    events = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={
        event_accumulator.IMAGES: 1, event_accumulator.SCALARS: 1, event_accumulator.TENSORS: 1,
        event_accumulator.HISTOGRAMS: 1, event_accumulator.COMPRESSED_HISTOGRAMS: 1}).Reload()
    out = {}
    for tag in events.Tags()[event_accumulator.IMAGES]:
        latest = max(events.Images(tag), key=lambda e: e.step)
        out[tag] = (latest.step, latest.encoded_image_string)
    return out


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("a TensorBoard image summary is not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def image_section(images: dict[str, tuple[int, bytes]]) -> str:
    """The panels, each drawn at an integer zoom that makes tiny images about 300 px wide (pixels kept sharp)."""
    def img(tag, png):
        width, height = png_size(png)
        zoom = max(1, min(8, 300 // width))
        return (f'<img alt="{html.escape(tag)}" width="{width * zoom}" height="{height * zoom}" '
                f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')

    figures = [f"<figure>{img(tag, png)}"
               f"<figcaption>{html.escape(tag)} (step {step})</figcaption></figure>"
               for tag, (step, png) in sorted(images.items())]
    return "<h2>Latest image panels</h2><div class='grid'>" + "".join(figures) + "</div>" if figures else ""


def run_summary(run_dir: Path, curves: dict) -> str:
    """The method, model and steps from config.yaml (when there) and the last logged step."""
    cfg_path, facts = run_dir / "config.yaml", []
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        model, method = cfg.get("model", {}), cfg.get("method", {})
        facts.append(f"method {method.get('name', '?')}, ViT width {model.get('embed_dim', '?')} depth "
                     f"{model.get('depth', '?')} patch {model.get('patch_size', '?')} at {model.get('img_size', '?')}"
                     f" px, {cfg.get('train', {}).get('steps', '?')} steps planned")
    last = max((points[-1][0] for points in curves.values()), default=None)
    facts.append(f"last logged step {last}" if last is not None else "no scalars logged")
    return "<p>" + html.escape("; ".join(facts)) + "</p>"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run report of `run_dir` to `out` (default `run_dir/report.html`); returns its path."""
    run_dir = Path(run_dir)
    curves = read_curves(run_dir / "metrics.jsonl")
    body = (run_summary(run_dir, curves) + curve_sections(curves) + evaluation_section(run_dir)
            + image_section(latest_images(run_dir / "tb")))
    title = html.escape(f"run report: {run_dir.resolve().name}")
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
                   f"</head><body><h1>{title}</h1>{body}</body></html>\n")
    return out


def report_quietly(run_dir: Path) -> Path | None:
    """write_report for the end of a run: any error is one warning line, never the run's failure."""
    try:
        path = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 (a report must not fail the run it summarises)
        log.warning("run report not written: %s: %s", type(err).__name__, err)
        return None
    log.info("run report: %s", path)
    return path
