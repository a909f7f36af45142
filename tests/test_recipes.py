"""Shipped recipes: `_base_:` includes, every recipe loads and restates no inherited value, the commands in the
docs name real recipes, and the wheel carries the recipes and DeepSpeed configs."""

import copy
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from helpers import REPO
from train.config import Config, ConfigError, _merge, from_dict, read_yaml, to_dict
from train.methods import method_class
from train.recipe import load_config

CONFIGS = REPO / "train" / "configs"
RUNNABLE = sorted(CONFIGS.glob("*.yaml"))
BASES = sorted((CONFIGS / "base").glob("*.yaml"))
OVERLAYS = sorted((CONFIGS / "compression").glob("*.yaml"))
OVERLAY_DEMO = {"mae": "mae_demo", "dino": "dino_demo", "moco_v3": "moco_v3_demo", "simclr": "simclr_demo"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Teacher weights only need to exist for a recipe to validate (pretrained encoders are not read either)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.bin"
    path.touch()
    return path


def typed(tree: dict) -> Config:
    """The tree as a Config, the method section from the registry (no validation)."""
    return from_dict(Config, tree, method_config=lambda name: method_class(name).Config)


def load_recipe(path, teacher, more=()):
    tree = read_yaml(path)
    method = tree.get("method") or {}
    stand_ins = [f"method.teacher.path={teacher}"] * ("teacher" in method) + ["method.init="] * ("init" in method)
    if (tree.get("data") or {}).get("train") and hasattr(typed(tree).method, "num_classes"):
        stand_ins.append("method.num_classes=1000")  # the manifest that would list the classes is not here
    run = typed(tree)  # on the GPUs its global batch is sized for (MoCo v3, SimCLR, DINO refuse accumulation)
    gpus = max(1, run.train.global_batch_size // run.data.batch_size)
    return load_config(path, stand_ins + list(more), world_size=gpus)


def test_base_includes_nest_resolve_relative_and_later_keys_win(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "size.yaml").write_text("model: {embed_dim: 64, num_heads: 2, depth: 3}\n")
    (tmp_path / "sub" / "method.yaml").write_text("_base_: size.yaml\nmodel: {depth: 5}\nmethod: {name: mae}\n")
    (tmp_path / "run.yaml").write_text("_base_: [sub/method.yaml, sub/size.yaml]\nmodel: {num_heads: 4}\n")
    tree = read_yaml(tmp_path / "run.yaml")
    # size.yaml, then method.yaml (its own base size.yaml, then depth 5), then size.yaml again (depth 3), then run
    assert tree == {"model": {"embed_dim": 64, "num_heads": 4, "depth": 3}, "method": {"name": "mae"}}
    cfg = load_config(tmp_path / "run.yaml", ["model.img_size=32", "model.patch_size=4", "train.steps=1"])
    assert (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.depth) == (64, 4, 3)


def test_include_errors_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: [a.yaml]\n")
    (tmp_path / "c.yaml").write_text("_base_: [nowhere.yaml]\n")
    (tmp_path / "d.yaml").write_text("_base_: {x: 1}\n")
    for name, message in [("a.yaml", "_base_ include cycle"), ("c.yaml", "config file not found"),
                          ("d.yaml", "_base_ must be a file name or a list")]:
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        text = str(err.value)
        assert message in text and "\n" not in text
        assert (name if name != "c.yaml" else "nowhere.yaml") in text
    with pytest.raises(ConfigError, match=r"in _base_ of .*c\.yaml"):
        load_config(tmp_path / "c.yaml")


def test_views_follow_the_method_unless_set():
    tiny = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.num_heads=2", "train.steps=1"]
    assert load_config(None, tiny + ["method.name=dino"]).data.views == "dino"
    assert load_config(None, tiny + ["method.name=moco_v3"]).data.views == "moco_v3"
    assert load_config(None, tiny + ["method.name=finetune"]).data.views == "finetune"
    assert load_config(None, tiny + ["method.name=hpm"]).data.views == "single"
    assert load_config(None, tiny + ["method.name=moco_v3", "data.views=simclr"]).data.views == "simclr"


@pytest.mark.parametrize("path", RUNNABLE + BASES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads_and_restates_nothing_it_inherits(path, teacher):
    cfg = load_recipe(path, teacher)
    if path.parent == CONFIGS:
        assert cfg.run.name == path.stem
    own = yaml.safe_load(path.read_text()) or {}
    bases = own.pop("_base_", [])
    inherited_tree: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge(inherited_tree, read_yaml(path.parent / base))
    base_method = (inherited_tree.get("method") or {}).get("name")
    # what the file would get without its own keys: its bases over the defaults, for the method it names
    probe = copy.deepcopy(inherited_tree)
    probe.setdefault("method", {})["name"] = cfg.method.name
    inherited = to_dict(typed(probe))
    final = to_dict(typed(read_yaml(path)))  # without the stand-ins of load_recipe

    def restated(node, ref, fin, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from restated(value, ref[key], fin[key], f"{name}.")
            elif name == "method.name":  # naming the method is allowed unless a base already names it
                if value == base_method:
                    yield name
            elif ref[key] == fin[key]:
                yield name

    assert not list(restated(own, inherited, final, "")), f"{path.name} restates inherited values"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_compression_overlay_stacks_on_its_demo(overlay):
    cfg = load_config([CONFIGS / f"{OVERLAY_DEMO[overlay.stem]}.yaml", overlay])
    assert cfg.method.name == overlay.stem


def test_every_config_the_docs_name_loads(teacher):
    text = "\n".join((REPO / doc).read_text() for doc in ("README.md", "DESIGN.md"))
    named = set(re.findall(r"(?:--config|slurm/pretrain\.sh)\s+(\S+\.yaml)", text))
    named |= set(re.findall(r"train/configs/[\w/]+\.yaml", text))
    named = {p for p in named if not p.isupper() and not p.startswith("RUN")}  # placeholders like RUN.yaml
    assert {"train/configs/mae_vit_b.yaml", "train/configs/hpm_vit_b.yaml"} <= named
    for name in sorted(named):
        assert (REPO / name).is_file(), f"{name} (named in README.md / DESIGN.md) does not exist"
        if name.startswith("train/configs/compression/"):
            load_config([CONFIGS / f"{OVERLAY_DEMO[(REPO / name).stem]}.yaml", REPO / name])
        elif "/model/" not in name and "/base/" not in name:
            load_recipe(REPO / name, teacher)


def test_mae_recipes_are_the_official_ones():
    sizes = {"b": (16, 768, 12, 12), "l": (16, 1024, 24, 16), "h": (14, 1280, 32, 16)}
    for size, (patch, dim, depth, heads) in sizes.items():
        cfg = load_config(CONFIGS / f"mae_vit_{size}.yaml", world_size=64)
        m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
        assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads) == (224, patch, dim, depth, heads)
        assert cfg.method.name == "mae" and cfg.method.norm_pix_loss and cfg.method.mask_ratio == 0.75
        assert (cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads) == (512, 8, 16)
        assert t.global_batch_size == 4096 and d.batch_size * 64 == 4096 and t.epochs == 800
        assert o.optimizer == "adamw" and o.base_lr == 1.5e-4 and o.betas == (0.9, 0.95)
        assert o.weight_decay == 0.05 and o.warmup_epochs == 40 and o.min_lr == 0
        assert d.views == "single" and d.crop_scale == (0.2, 1.0) and d.hflip == 0.5
        assert "1600" in (CONFIGS / f"mae_vit_{size}.yaml").read_text()


def test_wheel_ships_recipes_and_deepspeed_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("train", "data_pipeline", "ds_configs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, cwd=src, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("vitssl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in CONFIGS.rglob("*.yaml")}
    assert shipped <= names
    assert {f"train/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")} <= names
    assert {"train/configs/compression/mae.yaml", "train/configs/model/vit_l16.yaml",
            "train/ds_configs/zero1.json", "train/pretrain.py", "data_pipeline/shards/__main__.py"} <= names
