"""Evaluation and export: k-NN, linear probe and fine-tune methods, timm export from ZeRO checkpoints."""

import argparse
import json
import re
import subprocess

import pytest
import timm
import torch

from helpers import REPO, fully_partitioned_zero3, resume_run, run_env, torchrun
from train.config import ConfigError, ModelConfig
from train.engine import train
from train.eval.export import export
from train.eval.knn import main as knn_main
from train.eval.metrics import NearestNeighbours, knn_evaluate, knn_predict, topk_accuracy
from train.methods import METHODS, build_method
from train.models.vit import ViTEncoder
from train.optim import param_groups
from train.weights import load_encoder, resolve_source


def clustered_features(n_per_class: int, num_classes: int, dim: int = 16, seed: int = 0):
    """Features in `num_classes` tight clusters around random directions, with their labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=gen), labels


def test_knn_separable_features_100_percent_shuffled_labels_chance():
    train_f, train_y = clustered_features(50, 10, seed=0)
    val_f, val_y = clustered_features(20, 10, seed=0)
    val_f = val_f + 0.05 * torch.randn_like(val_f)
    acc = topk_accuracy(knn_predict(train_f, train_y, val_f, 10, k=20, chunk=64), val_y)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    chance = topk_accuracy(knn_predict(train_f, shuffled, val_f, 10, k=20), val_y)
    assert 0 < chance["top1"] < 25  # chance is 10%


def test_streamed_neighbours_equal_dino_vote_by_hand():
    gen = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    val_f = torch.randn(7, 8, generator=gen)
    k, t = 5, 0.1
    # DINO's knn_classifier: cosine similarity, top-k, weights exp(sim / T), summed per class
    sim = torch.nn.functional.normalize(val_f, dim=1) @ torch.nn.functional.normalize(train_f, dim=1).T
    top, idx = sim.topk(k, dim=1)
    expected = torch.zeros(7, 4).scatter_add_(1, train_y[idx], (top / t).exp())
    neighbours = NearestNeighbours(val_f, k, chunk=3)
    for start in range(0, 50, 6):  # keys stream past in batches; queries in chunks of 3
        neighbours.add(train_f[start:start + 6], train_y[start:start + 6])
    assert torch.allclose(neighbours.scores(4, k, t), expected, rtol=1e-5)
    # fewer keys than k: the empty slots do not vote
    few = NearestNeighbours(val_f, k)
    few.add(train_f[:2], train_y[:2])
    assert torch.allclose(few.scores(4, k, t).sum(1), (few.sim[:, :2] / t).exp().sum(1))


@pytest.mark.parametrize("size, dims", [
    ("tiny", dict(embed_dim=192, depth=12, num_heads=3)), ("base", dict(embed_dim=768, depth=12, num_heads=12)),
    ("large", dict(embed_dim=1024, depth=24, num_heads=16)), ("huge", dict(embed_dim=1280, depth=32, num_heads=16)),
])
@pytest.mark.parametrize("patch", [14, 16])
def test_timm_spec_names_a_timm_vit_with_exactly_our_keys(size, dims, patch):
    with torch.device("meta"):
        enc = ViTEncoder(ModelConfig(img_size=224, patch_size=patch, **dims))
        name, kwargs = enc.timm_spec()
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    assert name.startswith(f"vit_{size}_patch") and name in timm.list_models()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in enc.vit.state_dict().items()}


def test_layer_decay_scales_are_maes(make_cfg):
    cfg = make_cfg("method.name=finetune", "method.pool=token", "train.steps=2")
    method = build_method(cfg)
    scale = {}
    for group in param_groups(method, 0.05, layer_decay=0.5):
        scale.update({id(p): group["lr_scale"] for p in group["params"]})
    depth = cfg.model.depth
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        block = re.match(r"encoder\.vit\.blocks\.(\d+)\.", name)
        # MAE's get_layer_id_for_vit: stem 0, block i -> i + 1, the rest depth + 1; scale decay^(depth + 1 - id)
        layer = int(block[1]) + 1 if block else 0 if re.match(r"encoder\.vit\.(cls_token|patch_embed)", name) \
            else depth + 1
        assert scale[id(p)] == 0.5 ** (depth + 1 - layer), name


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, digits_dir):
    """A tiny MAE pretraining run (ZeRO-2, 2 steps) to evaluate, fine-tune and export."""
    from helpers import tiny_overrides
    from train.recipe import load_config

    out = tmp_path_factory.mktemp("mae")
    cfg = load_config(None, tiny_overrides() + [f"run.output_dir={out}", f"data.train={digits_dir / 'train.json'}",
                                                f"data.val={digits_dir / 'val.json'}", "train.steps=2",
                                                "train.deepspeed=ds_configs/zero2.json"])
    train(cfg, build_method)
    return out


def live_logits_hook(store: dict, images: torch.Tensor):
    """An engine `evaluate` hook recording the live model's logits on `images`."""
    def evaluate(module, step):
        with torch.no_grad():
            store["logits"] = module.eval().logits(images).float()
        module.train()
        return {}
    return evaluate


@pytest.mark.e2e
@pytest.mark.parametrize("method, extra", [
    ("finetune", ["optim.layer_decay=0.75", "model.drop_path=0.1", "data.views=finetune", "method.pool=avg"]),
    ("linear_probe", ["optim.optimizer=lars", "train.deepspeed=ds_configs/zero0.json", "train.precision=fp32"]),
])
def test_classifier_export_gives_the_live_models_logits_in_timm(make_cfg, mae_run, tmp_path, method, extra):
    cfg = make_cfg(f"method.name={method}", f"method.init={mae_run}", "train.steps=3", "run.ckpt_every=3", *extra)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    live = {}
    result = train(cfg, build_method, evaluate=live_logits_hook(live, images))
    assert result.last_checkpoint == "step_00000003" and "logits" in live
    out = export(cfg.output_dir, tmp_path / "export")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # no network: timm's local folder
    with torch.no_grad():
        ours = model(images)
    # the probe's BatchNorm is folded into timm's linear head; mean pooling + fc_norm for fine-tuning
    assert torch.allclose(ours, live["logits"], atol=1e-4), (ours - live["logits"]).abs().max()
    timm_cfg = json.loads((out / "config.json").read_text())
    assert timm_cfg["architecture"] == model.default_cfg["architecture"] and timm_cfg["num_classes"] == 10
    assert timm_cfg["vitssl"]["method"] == method and timm_cfg["vitssl"]["step"] == 3


@pytest.mark.e2e
def test_finetune_run_writes_eval_json_and_tensorboard(mae_run, digits_dir, tmp_path):
    from helpers import tiny_overrides
    from train.eval.finetune import main

    out = tmp_path / "ft"
    rc = main(tiny_overrides(["method.name=finetune"]) + [
        f"method.init={mae_run}", f"run.output_dir={out}", f"data.train={digits_dir / 'train.json'}",
        f"data.val={digits_dir / 'val.json'}", "train.steps=2", "run.ckpt_every=2", "method.mixup=0.8",
        "method.cutmix=1.0", "method.label_smoothing=0.1"])
    assert rc == 0
    result = json.loads((out / "eval" / "finetune_step_00000002.json").read_text())
    assert result["num_samples"] == 355 and 0 <= result["top1"] <= result["top5"] <= 100
    assert result["loss"] == pytest.approx(2.30, abs=0.3)  # ~ln(10) after 2 steps from a fresh head
    assert list((out / "tb").glob("events.out.tfevents.*"))
    report = (out / "report.html").read_text()  # the run's report, with its evaluation curve and result table
    assert 'data-key="eval/top1"' in report and f"<tr><td>top1</td><td>{result['top1']:.4g}</td></tr>" in report


ZERO3_SCRIPT = """
import json, sys
import deepspeed, torch
from train.recipe import load_config
from train.engine import train
from train.eval.metrics import knn_evaluate
from train.methods import build_method

cfg = load_config(None, json.loads(sys.argv[1]), world_size=2)

def evaluate(module, step):
    encoder = module.encoder
    # the partitioned module, gathered: the weights the live model holds
    with deepspeed.zero.GatheredParameters(list(encoder.parameters())):
        live = {k: v.detach().clone() for k, v in encoder.vit.state_dict().items()}
    knn = knn_evaluate(encoder, cfg.data.train, cfg.data.val, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                       torch.device("cpu"), batch_size=128)
    if torch.distributed.get_rank() == 0:
        torch.save({"live": live, "knn": knn}, sys.argv[2])
    return {"eval/knn_top1": knn["k20"]["top1"]}

train(cfg, build_method, evaluate=evaluate)
"""


@pytest.mark.e2e
def test_zero3_two_ranks_export_is_the_live_model_and_distributed_knn_agrees(tmp_path, digits_dir):
    from helpers import tiny_overrides

    script = tmp_path / "zero3_run.py"
    script.write_text(ZERO3_SCRIPT)
    out = tmp_path / "run"
    overrides = tiny_overrides() + [f"run.output_dir={out}", f"data.train={digits_dir / 'train.json'}",
                                    f"data.val={digits_dir / 'val.json'}", "train.steps=2", "run.ckpt_every=2",
                                    f"train.deepspeed={fully_partitioned_zero3(tmp_path)}"]
    proc = subprocess.run([*torchrun(2), str(script), json.dumps(overrides), str(tmp_path / "live.pt")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000002"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # really ZeRO-3 over two ranks
    written = torch.load(tmp_path / "live.pt")
    exported = export(out, tmp_path / "export")
    from safetensors.torch import load_file

    weights = load_file(exported / "model.safetensors")
    assert set(weights) == set(written["live"])
    for key, value in written["live"].items():
        assert torch.equal(weights[key], value), key
    # the exported encoder, single process, gives the same k-NN as the two partitioned ranks did together
    from train.eval.metrics import knn_evaluate

    source = resolve_source(exported)
    encoder = load_encoder(source, METHODS)
    single = knn_evaluate(encoder, str(digits_dir / "train.json"), str(digits_dir / "val.json"), 16,
                          source.data_value("mean"), source.data_value("std"), torch.device("cpu"), batch_size=128)
    distributed = written["knn"]
    assert distributed["num_train"] == single["num_train"] == 1442 and distributed["num_val"] == 355
    assert distributed["k20"]["top1"] == pytest.approx(single["k20"]["top1"], abs=0.6)  # at most 2 ties flip
    assert single["k20"]["top1"] > 25  # well above chance (10%) even after 2 steps
    # timm gives our encoder's features
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (model(images) - encoder.eval()(images, pool="token")).abs().max() < 1e-5


@pytest.mark.e2e
def test_bad_inputs_are_one_line_errors(make_cfg, mae_run, tmp_path, digits_dir, capsys):
    with pytest.raises(ConfigError, match=r"method.init: .* model.depth=2, this run has model.depth=3"):
        make_cfg("method.name=finetune", f"method.init={mae_run}", "model.depth=3", "train.steps=2")
    with pytest.raises(ConfigError, match=r"method.num_classes=5 but .*train.json lists 10 classes"):
        make_cfg("method.name=linear_probe", "method.num_classes=5", "train.steps=2")
    with pytest.raises(ConfigError, match="not a complete checkpoint|no complete checkpoint"):
        resolve_source(tmp_path)
    assert knn_main([str(mae_run), "--val", str(tmp_path / "missing.json"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0], err
    assert knn_main([str(tmp_path / "nowhere"), "--workers", "0"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.e2e
def test_finetune_resume_retraces_the_curve_with_mixup_erasing_and_randaugment(make_cfg, mae_run, tmp_path):

    def train_losses(out_dir) -> dict[int, float]:  # evaluation rows share the step: keep the training ones
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}

    args = ("method.name=finetune", f"method.init={mae_run}", "train.steps=4", "run.ckpt_every=2",
            "data.views=finetune", "model.drop_path=0.1", "optim.layer_decay=0.75")
    straight = make_cfg(*args, name="straight")
    # evaluation must not shift RNGs
    train(straight, build_method, evaluate=live_logits_hook({}, torch.randn(2, 3, 16, 16)))
    full = train_losses(straight.output_dir)
    resumed = make_cfg(*args, name="resumed")
    resume_run(resumed, straight.output_dir, 2)
    rows = train_losses(resumed.output_dir)
    assert sorted(rows) == [3, 4] and sorted(full) == [1, 2, 3, 4]
    assert [rows[3], rows[4]] == pytest.approx([full[3], full[4]], rel=1e-6, abs=1e-7)


# -- official releases as sources ---------------------------------------------------------------------------

OFFICIAL_ARCH = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=1"]


def official_encoder(seed: int) -> ViTEncoder:
    torch.manual_seed(seed)
    encoder = ViTEncoder(ModelConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1))
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and biases not at their init: every tensor must be mapped
    return encoder.eval()


def official_files(tmp_path) -> dict[str, tuple]:
    """Checkpoint files in the official releases' key layouts, each with the encoder it must give."""
    teacher, student, base, momentum = (official_encoder(s) for s in range(4))

    def timm_keys(encoder, prefix=""):
        return {prefix + k: v.clone() for k, v in encoder.vit.state_dict().items()}

    head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_g": torch.ones(8, 1)}
    files = {
        "mae": ({"model": {**timm_keys(teacher), "mask_token": torch.zeros(1, 1, 16),
                           "decoder_embed.weight": torch.randn(16, 64), "decoder_embed.bias": torch.zeros(16)}},
                teacher),
        "dino_teacher": ({"teacher": {**timm_keys(teacher, "backbone."), **head},
                          "student": {**timm_keys(student, "module.backbone."),
                                      **{"module." + k: v for k, v in head.items()}}, "epoch": 100,
                          "args": argparse.Namespace(arch="vit_tiny")}, teacher),
        "dino_backbone": (timm_keys(teacher), teacher),
        "moco_v3": ({"epoch": 300, "arch": "vit_base", "state_dict": {
            **timm_keys(base, "module.base_encoder."), **timm_keys(momentum, "module.momentum_encoder."),
            "module.base_encoder.head.0.weight": torch.randn(32, 64),
            "module.momentum_encoder.head.0.weight": torch.randn(32, 64),
            "module.predictor.0.weight": torch.randn(32, 32)}}, momentum),
    }
    out = {}
    for name, (obj, encoder) in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        out[name] = (tmp_path / f"{name}.pth", encoder)
    out["dino_student"] = (f"{out['dino_teacher'][0]}:student", student)
    out["moco_v3_base"] = (f"{out['moco_v3'][0]}:base_encoder", base)
    return out


def test_official_checkpoints_are_sources_with_their_encoders(tmp_path, make_cfg):
    """MAE, DINO (teacher, student, backbone-only) and MoCo v3 (momentum, base) layouts: the encoder loaded
    from each gives the features of the encoder written into it; method.init and export take them too."""
    images = torch.randn(4, 3, 32, 32)
    for name, (path, expected) in official_files(tmp_path).items():
        source = resolve_source(path)
        assert source.kind == "official" and source.model_config().embed_dim == 64, name
        with torch.no_grad():
            ours = load_encoder(source, METHODS).eval()(images, pool="token")
            assert torch.equal(ours, expected(images, pool="token")), name
    path, expected = official_files(tmp_path)["moco_v3"]
    probe = build_method(make_cfg("method.name=linear_probe", f"method.init={path}", "train.steps=1", *OFFICIAL_ARCH))
    with torch.no_grad():
        assert torch.equal(probe.encoder(images, pool="token"), expected(images, pool="token"))
    out = export(path, tmp_path / "exported")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), expected(images, pool="token"), atol=1e-6)


def test_official_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    files = official_files(tmp_path)
    path = files["dino_teacher"][0]
    with pytest.raises(ConfigError, match=re.escape(f"{path}:momentum_encoder: a dino checkpoint has the parts")):
        resolve_source(f"{path}:momentum_encoder")
    obj = torch.load(files["mae"][0], weights_only=False)
    del obj["model"]["norm.weight"]
    obj["model"]["pre_logits.weight"] = torch.ones(64)
    torch.save(obj, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'broken.pth'}: weights do not fit the model "
                                                    "(another architecture?): missing ['norm.weight'], unexpected "
                                                    "['pre_logits.weight']")):
        load_encoder(resolve_source(tmp_path / "broken.pth"), METHODS)
    obj = torch.load(files["moco_v3"][0], weights_only=False)
    obj["state_dict"]["module.queue"] = torch.zeros(3)
    torch.save(obj, tmp_path / "queue.pth")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'queue.pth'}: a moco_v3 checkpoint with "
                                                    "unexpected keys ['module.queue']")):
        resolve_source(tmp_path / "queue.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not an official MAE .* it holds \\['weights'\\]"):
        resolve_source(tmp_path / "other.pth")


def test_knn_on_an_official_checkpoint_is_the_knn_of_its_encoder(tmp_path, digits_dir):
    """The k-NN command on a MoCo v3 file: the same protocol and result as on the encoder it holds."""
    path, expected = official_files(tmp_path)["moco_v3"]
    train_urls, val_urls = str(digits_dir / "train.json"), str(digits_dir / "val.json")
    assert knn_main([str(path), "--train", train_urls, "--val", val_urls, "--k", "10", "--workers", "0",
                     "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "eval" / "knn_moco_v3_token.json").read_text())  # named by pool
    direct = knn_evaluate(expected, train_urls, val_urls, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                          torch.device("cpu"), ks=(10,), num_classes=10)
    assert result["k10"]["top1"] == pytest.approx(direct["k10"]["top1"]) and result["method"] == "moco_v3 (official)"
    assert result["k10"]["top1"] > 15  # a random 2-block ViT on the digits is well above chance (10%)
