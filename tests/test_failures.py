"""Failures end fast and say why: no hang after an error, no orphaned workers, no silent spin on bad data."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.augment import SingleView
from data_pipeline.stream import DataError, EvalStream, StreamLoader
from helpers import REPO, InfiniteGradient, tiny_overrides
from train.engine import train
from train.methods import build_method

ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def alive(pid: int) -> bool:
    """A process exists and is not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_an_error_with_loader_workers_exits_at_once(digits_dir):
    """The training process holds the loader's iterator while an exception ends it: exit must not wait forever."""
    proc = subprocess.run(script(f"""
        from data_pipeline.augment import SingleView
        from data_pipeline.stream import StreamLoader, resolve_shards
        loader = StreamLoader(resolve_shards("{digits_dir / 'train.json'}").urls, SingleView(16, (0.5, 1.0), True),
                              4, workers=2)
        batches = iter(loader)
        next(batches)
        raise RuntimeError("boom")
        """), env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("RuntimeError: boom"), proc.stderr


def test_workers_ignore_preemption_signals_but_never_outlive_the_training_process(digits_dir):
    shard = digits_dir / "train-000000.tar"
    proc = subprocess.Popen(script(f"""
        import multiprocessing, time
        from data_pipeline.augment import SingleView
        from data_pipeline.stream import StreamLoader
        # the worker blocks in a slow pipe: command, where torch's own parent polling cannot run
        loader = StreamLoader(["pipe:sleep 20; cat {shard}"], SingleView(16, (0.5, 1.0), True), 4, workers=1)
        batches = iter(loader.loader)
        print(*[p.pid for p in multiprocessing.active_children()], flush=True)
        time.sleep(60)
        """), env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        (worker,) = map(int, proc.stdout.readline().split())
        deadline = time.time() + 30
        while not Path(f"/proc/{worker}/task/{worker}/children").read_text().strip():  # set up, in the pipe
            assert time.time() < deadline and alive(worker)
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm signals every process of the step
            os.kill(worker, sig)
        time.sleep(1)
        assert alive(worker) and proc.poll() is None
        proc.kill()  # kill -9 of the training process
        deadline = time.time() + 5
        while alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "the DataLoader worker outlived the killed training process"
    finally:
        proc.kill()
        proc.wait()


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_dotted_keys_read_as_imagenet_and_img2dataset_name_them(tmp_path):
    """`n01440764_10026.JPEG.jpg`: the key is the name up to the last dot (webdataset's rule: the first)."""
    members = {}
    for i in range(6):
        members[f"n0144076{i % 2}_{i}.JPEG.jpg"] = jpeg(i)
        members[f"n0144076{i % 2}_{i}.JPEG.cls"] = str(i % 2).encode()
    url = write_tar(tmp_path / "dotted.tar", members)
    batch = next(iter(StreamLoader([url], SingleView(16), 6, shuffle_buffer=0, resampled=False)))
    assert batch["images"].shape == (6, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 0, 1, 0, 1]
    assert next(iter(EvalStream([url], SingleView(16), 6)))["labels"].tolist() == [0, 1, 0, 1, 0, 1]


def test_samples_that_never_decode_stop_with_the_reason(tmp_path):
    url = write_tar(tmp_path / "noimage.tar", {f"{i:04d}.tif": b"II*\0" for i in range(50)})
    start = time.time()
    with pytest.raises(DataError) as err:
        next(iter(StreamLoader([url], SingleView(16), 4)))
    message = str(err.value)
    assert "\n" not in message and time.time() - start < 10
    assert "samples in a row could not be decoded; the last, 00" in message and "noimage.tar" in message
    assert "no image file among its files ['tif']" in message


def test_a_run_on_shards_that_never_decode_exits_with_one_line(tmp_path):
    """Through the entry point with loader workers: the error ends the process (no exit join on workers)."""
    url = write_tar(tmp_path / "noimage.tar", {f"{i:04d}.tif": b"II*\0" for i in range(50)})
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *tiny_overrides(), "data.workers=2",
                           "train.steps=5", f"data.train={url}", f"run.output_dir={tmp_path / 'run'}"],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 reader ") and "could not be decoded" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"exit after {time.time() - start:.1f} s")


def bad_setups(tmp: Path, digits: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (entry-point arguments, what the one error line must say); writes the files the cases need."""
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((digits / "train.json").read_text())
    (tmp / "lost.json").write_text(json.dumps({**manifest, "shards": [
        {**s, "url": str(digits / s["url"])} for s in manifest["shards"]] + [{"url": "gone-000099.tar", "count": 1}]}))
    (tmp / "broken.json").write_text("{not json")
    ds = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    for name, change in {"optimizer": {"optimizer": {"type": "Adam"}}, "stage": {"zero_optimization": {"stage": 5}},
                         "typo": {"zero_optimization": {**ds["zero_optimization"], "overlap_com": True}}}.items():
        (tmp / f"ds_{name}.json").write_text(json.dumps({**ds, **change}))
    yamls = {"empty": "", "list": "- model\n- data\n", "twice": "model:\n  depth: 2\nmodel:\n  depth: 4\n",
             "dupkey": "optim:\n  base_lr: 1e-3\n  base_lr: 1e-4\n"}
    for name, text in yamls.items():
        (tmp / f"{name}.yaml").write_text(text)
    shard = f"{digits}/train-{{000000..000009}}.tar"
    return {
        "train manifest missing": ([f"data.train={tmp / 'none.json'}"], "data.train: manifest not found"),
        "train is a directory": ([f"data.train={digits}"], f"data.train: {digits} is a directory; give its manifest"),
        "brace pattern names missing shards": ([f"data.train={shard}"], "data.train: shard not found"),
        "manifest lists a missing shard": ([f"data.train={tmp / 'lost.json'}"], "gone-000099.tar (1 of"),
        "manifest not json": ([f"data.train={tmp / 'broken.json'}"], "is not a readable shard manifest"),
        "val missing": ([f"data.val={tmp / 'val-{0..3}.tar'}"], "data.val: shard not found"),
        "deepspeed optimizer": ([f"train.deepspeed={tmp / 'ds_optimizer.json'}"], "remove 'optimizer'"),
        "deepspeed stage": ([f"train.deepspeed={tmp / 'ds_stage.json'}"], "ds_stage.json: DeepSpeed rejects it: stage"),
        "deepspeed typo": ([f"train.deepspeed={tmp / 'ds_typo.json'}"], "overlap_com: Extra inputs are not permitted"),
        "patch size 0": (["model.patch_size=0"], "model.patch_size=0 must be >= 1"),
        "no heads": (["model.num_heads=0"], "model.num_heads=0 must be >= 1"),
        "no depth": (["model.depth=0"], "model.depth=0 must be >= 1"),
        "negative width": (["model.embed_dim=-32"], "model.embed_dim=-32 must be >= 1"),
        "negative decay": (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
        "nothing masked": (["method.mask_ratio=0"], "method.mask_ratio=0.0 must be in (0, 1)"),
        "unknown pool": (["eval.pool=mean"], "eval.pool='mean': choose token or avg"),
        "monitor without val": (["eval.every=1", "data.val="], "eval.every: the online monitor reads a labelled"),
        "epochs without a sample count": (["train.steps=0", "train.epochs=1", f"data.train={digits}/train-000000.tar"],
                                          "train.epochs needs the sample count"),
        "empty yaml": ([f"--config={tmp / 'empty.yaml'}"], "empty.yaml: the file is empty"),
        "yaml list": ([f"--config={tmp / 'list.yaml'}"], "list.yaml: top level must be a mapping of sections"),
        "yaml section twice": ([f"--config={tmp / 'twice.yaml'}"], "twice.yaml: line 3 not valid YAML (duplicate key"),
        "yaml key twice": ([f"--config={tmp / 'dupkey.yaml'}"], "dupkey.yaml: line 3 not valid YAML (duplicate key"),
    }


def error_line(stderr: str) -> str:
    """The one line a failed start reports: it is the last line, the only `config error`, with no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and sum(line.startswith("config error: ") for line in lines) == 1, stderr
    return lines[-1]


def test_every_bad_setup_is_one_config_error_line_before_the_first_step(tmp_path, digits_dir, capsys):
    from train.pretrain import main

    base = [*tiny_overrides(), "train.steps=2", f"data.train={digits_dir / 'train.json'}",
            f"data.val={digits_dir / 'val.json'}"]
    for name, (argv, message) in bad_setups(tmp_path / "files", digits_dir).items():
        code = main([*base, f"run.output_dir={tmp_path / 'runs'}", *argv])
        line = error_line(capsys.readouterr().err)
        assert code == 2 and line.startswith("config error: ") and message in line, (name, line)
    # checkpoints this run cannot continue: another model, another number of ranks
    assert main([*base, f"run.output_dir={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    assert main([*base, f"run.output_dir={tmp_path / 'run'}", "train.steps=4", "model.depth=3"]) == 2
    assert "step_00000002 was written by method mae with model" in error_line(capsys.readouterr().err)
    saved = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copy(saved / "rank_00000.pt", saved / "rank_00001.pt")  # as if written by two ranks
    assert main([*base, f"run.output_dir={tmp_path / 'run'}", "train.steps=4"]) == 2
    assert ("was written by 2 ranks and this run has 1 at global batch 16, this run's is 8; set "
            "train.global_batch_size=16") in error_line(capsys.readouterr().err)


def test_a_bad_setup_stops_the_real_process_with_exit_2_and_one_line(tmp_path, digits_dir):
    argv, message = bad_setups(tmp_path, digits_dir)["deepspeed typo"]
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", *tiny_overrides(), "train.steps=2", *argv],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in error_line(proc.stderr)


def test_steps_deepspeed_skips_are_failures_not_progress(make_cfg, monkeypatch):
    from train.methods.mae import MAE

    original = MAE.forward
    poison_from = {"step": 2}

    def overflowing(self, batch, step=0):
        loss, report = original(self, batch, step)
        return (InfiniteGradient.apply(loss) if step >= poison_from["step"] else loss), report

    monkeypatch.setattr(MAE, "forward", overflowing)
    cfg = make_cfg("train.steps=12", "run.ckpt_every=2", "train.max_skipped_steps=3", name="skips")
    with pytest.raises(FloatingPointError) as err:
        train(cfg, build_method)
    # steps 3.. are skipped; the 4th in a row (step 6) stops; step 4's checkpoint was written while skipping
    assert "DeepSpeed skipped 4 optimizer steps in a row up to step 6" in str(err.value)
    assert f"the last good checkpoint is step_00000002 in {cfg.output_dir / 'checkpoints'}" in str(err.value)
    assert "\n" not in str(err.value)
    # a short run that never applied a step does not end as a success
    poison_from["step"] = 0
    with pytest.raises(FloatingPointError, match=r"skipped every optimizer step of this run \(to step 2\)"):
        train(make_cfg("train.steps=2", name="all_skipped"), build_method)


def test_resumed_runs_record_every_step_once(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.checkpoint import tag_for

    cfg = make_cfg("train.steps=6", "run.ckpt_every=3", "run.image_every=3", "run.keep_last=0", name="records")
    train(cfg, build_method)
    ckpts = cfg.output_dir / "checkpoints"
    for _ in range(2):  # killed after step 6 was logged but before its checkpoint counted, twice
        shutil.rmtree(ckpts / tag_for(6))
        (ckpts / "latest").write_text(tag_for(3))
        train(cfg, build_method)
    rows = [json.loads(line)["step"] for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(cfg.output_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    for tag in events.Tags()["images"]:
        assert [e.step for e in events.Images(tag)] == [3, 6], tag


def test_shards_without_labels_train_and_label_needing_steps_say_so_first(tmp_path, caplog, capsys):
    """img2dataset's layout (jpg + json + txt, no cls): pretraining needs no labels, k-NN does."""
    from data_pipeline.shards.__main__ import main as shards_main
    from train.eval.knn import main as knn_main
    from train.pretrain import main

    for shard in range(2):
        write_tar(tmp_path / f"web-{shard:06d}.tar", {
            f"{shard}{i:08d}.{ext}": data for i in range(24)
            for ext, data in (("jpg", jpeg(i)), ("json", b'{"caption": "x"}'), ("txt", b"x"))})
    shards = str(tmp_path / "web-{000000..000001}.tar")
    assert shards_main(["verify", shards, "--workers", "1"]) == 1  # labels are checked by default
    assert shards_main(["verify", shards, "--workers", "1", "--no-labels"]) == 0
    assert "48 samples read, 0 problems" in capsys.readouterr().out
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="train"):
        assert main([*tiny_overrides(), "train.steps=2", f"data.train={shards}", f"data.val={shards}",
                     "eval.at_end=true", f"run.output_dir={run}"]) == 0
    assert f"end-of-run evaluation skipped: data.train: {shards} has no class labels" in caplog.text
    assert not (run / "eval.json").exists()
    capsys.readouterr()
    assert knn_main([str(run), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --train: ") and "has no class labels" in err and "\n" not in err


def test_damage_reports_are_one_readable_line_each(tmp_path, caplog):
    whole = Path(write_tar(tmp_path / "whole.tar", {f"{i:04d}.{e}": d for i in range(3)
                                                    for e, d in (("jpg", jpeg(i)), ("cls", b"1"))}))
    with tarfile.open(whole) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "0001.jpg").offset_data + 20
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut])
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"x" * 3000)
    urls = [str(tmp_path / f"{name}.tar") for name in ("cut", "zero", "junk")]
    stream = StreamLoader(urls, SingleView(16), 1, resampled=False, shuffle_buffer=0)
    with caplog.at_level("WARNING", logger="data_pipeline.stream"):
        assert next(iter(stream))["labels"].tolist() == [1]  # cut.tar's first sample
        reports = [r.getMessage() for r in caplog.records]
    problems = [r.split(": ", 1)[1] for r in reports]
    assert set(problems) == {f"{urls[0]}: truncated shard (the tar ends inside a file)",
                             f"{urls[1]}: empty shard (no bytes)", f"{urls[2]}: not a tar file (invalid header)"}
    # once a pass: the first pass reports each once; the loader reads one batch ahead, into the second pass
    assert len(set(problems[:3])) == 3 and all(problems.count(problem) <= 2 for problem in problems)
    assert reports[0].startswith("skipped (1 so far): ") and not any("<" in r or " at 0x" in r for r in reports)


def test_small_ones_export_mode_knn_file_names_shard_lists_and_cpu_threads(make_cfg, digits_dir, tmp_path):
    from data_pipeline.stream import resolve_shards
    from train.distributed import cpu_threads_per_rank
    from train.eval.export import export
    from train.eval.knn import main as knn_main

    # `a.tar::b-{..}.tar` lists and local globs name shards as the manifest does
    every = resolve_shards(str(digits_dir / "train.json")).urls
    assert resolve_shards(f"{every[0]}::{digits_dir}/train-{{000001..000002}}.tar").urls == every[:3]
    assert resolve_shards(str(digits_dir / "train-*.tar")).urls == every
    # deepspeed's launcher leaves OMP_NUM_THREADS unset: CPU ranks share the node's cores
    assert cpu_threads_per_rank({"LOCAL_SIZE": "4"}, 16) == 4 and cpu_threads_per_rank({"LOCAL_SIZE": "8"}, 4) == 1
    assert cpu_threads_per_rank({"LOCAL_SIZE": "4", "OMP_NUM_THREADS": "2"}, 16) is None
    assert cpu_threads_per_rank({}, 16) is None
    cfg = make_cfg("train.steps=1", name="small")
    train(cfg, build_method)
    exported = export(cfg.output_dir, tmp_path / "timm")
    assert oct((exported / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert knn_main([str(cfg.output_dir), "--pool", "avg", "--workers", "0"]) == 0
    assert (cfg.output_dir / "eval" / "knn_step_00000001_avg.json").is_file()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_deepspeeds_known_deprecation_warnings_are_filtered_once_for_the_project():
    """In a process of the project (pytest itself ignores FutureWarnings): only the named ones are hidden."""
    proc = subprocess.run(script("""
        import warnings
        import train
        for message in ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                        "`torch.distributed.all_gather_single` instead.",
                        "`torch.cuda.amp.custom_fwd(args...)` is deprecated. Please use "
                        "`torch.amp.custom_fwd(args..., device_type='cuda')` instead.",
                        "something else is deprecated"):
            warnings.warn(message, FutureWarning, stacklevel=1)
        """), env={**ENV, "PYTHONWARNINGS": "default"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FutureWarning: something else is deprecated" in proc.stderr, proc.stderr
    assert "all_gather_into_tensor" not in proc.stderr and "custom_fwd" not in proc.stderr


def test_a_failed_universal_conversion_is_one_error_on_every_rank(tmp_path):
    """Elastic resume of a damaged checkpoint: rank 0's conversion fails with an error naming the checkpoint and
    leaves no half-written universal folder; the ranks waiting for it (by watching the files, not in a collective
    that a long conversion would time out) raise the same error."""
    import threading

    from train.checkpoint import MARKER, to_universal

    tag = tmp_path / "step_00000002"
    tag.mkdir()
    (tag / MARKER).write_text(json.dumps({"step": 2}))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    message = rf"elastic resume: converting {tag} to DeepSpeed's universal form failed on rank 0: UnpicklingError"
    with pytest.raises(RuntimeError, match=message):
        to_universal(tmp_path, tag.name, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_00000002_universal.failed", tag.name]
    with pytest.raises(RuntimeError, match=message):
        to_universal(tmp_path, tag.name, rank=1)
    # a waiting rank returns once rank 0 marks the conversion complete
    (tmp_path / ".step_00000002_universal.failed").unlink()
    done = tmp_path / "step_00000002_universal"
    threading.Timer(0.3, lambda: (done.mkdir(), (done / MARKER).write_text("{}"))).start()
    assert to_universal(tmp_path, tag.name, rank=1, poll_seconds=0.05) == done.name
    with pytest.raises(RuntimeError, match="rank 0 did not convert .* within 0.0001 h"):
        to_universal(tmp_path, "step_00000004", rank=1, poll_seconds=0.05, give_up_hours=1e-4)
