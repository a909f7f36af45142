"""Frozen CLIP teachers from local files, grid alignment, and the k-means of the k-CLIP tokenizer."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from helpers import TINY_CLIP, timm_to_openai_clip, timm_to_openai_resnet, tiny_resnet_clip
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.recipe import load_config
from train.teachers.clip import CLIP_MEAN, CLIP_STD, FrozenTeacher, TeacherConfig, align_to_grid, load_tower
from train.teachers.kmeans import assign, kmeans
from train.teachers.tokenizer import KCLIPTokenizer


def torchscript_archive(state: dict, path) -> None:
    """Save `state` the way OpenAI's CLIP releases hold their weights: a TorchScript archive."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_clip_224", pretrained=False, **TINY_CLIP).eval()


def test_kmeans_recovers_well_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=gen) * 10
    labels = torch.arange(6).repeat_interleave(100)
    x = centers[labels] + 0.1 * torch.randn(600, 8, generator=gen)
    order = torch.randperm(600, generator=gen)
    x, labels = x[order], labels[order]
    centroids, mse = kmeans(x, 6, iters=10, init="kmeans++", seed=0)
    found = assign(x, centroids)
    # one code per true cluster and one true cluster per code
    pairs = {(int(t), int(f)) for t, f in zip(labels, found)}
    assert len(pairs) == 6 and len({t for t, _ in pairs}) == 6 and len({f for _, f in pairs}) == 6
    for true, code in pairs:
        assert torch.allclose(centroids[code], x[labels == true].mean(0), atol=1e-4)
        assert (centroids[code] - centers[true]).norm() < 0.1
    assert mse == pytest.approx(0.01 * 8, rel=0.2)  # the noise variance per point


def test_empty_clusters_are_reseeded():
    # four distinct points, 50 copies each: a random init nearly always draws a point twice, leaving a
    # cluster empty after the first assignment; re-seeding it must still find all four
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    x = points.repeat_interleave(50, dim=0)
    for seed in range(5):
        centroids, mse = kmeans(x, 4, iters=5, init="random", seed=seed)
        assert mse == 0.0
        assert sorted(map(tuple, centroids.tolist())) == sorted(map(tuple, points.tolist()))


def test_assign_is_nearest_centroid():
    gen = torch.Generator().manual_seed(1)
    x, centroids = torch.randn(2, 500, 16, generator=gen), torch.randn(37, 16, generator=gen)
    ids = assign(x, centroids, chunk=64)
    assert ids.shape == (2, 500) and ids.dtype == torch.long
    assert torch.equal(ids, torch.cdist(x, centroids[None].expand(2, -1, -1)).argmin(-1))


@pytest.mark.parametrize("fmt", ["openai", "openai_torchscript", "timm", "timm_safetensors"])
def test_teacher_loads_clip_and_timm_checkpoints(tower, tmp_path, fmt):
    state = tower.state_dict()
    path = tmp_path / {"openai": "clip.bin", "openai_torchscript": "ViT-tiny.pt", "timm": "tower.pth",
                       "timm_safetensors": "tower.safetensors"}[fmt]
    if fmt == "openai":
        torch.save({"state_dict": timm_to_openai_clip(state)}, path)
    elif fmt == "openai_torchscript":
        torchscript_archive(timm_to_openai_clip(state), path)
    elif fmt == "timm":
        torch.save({"module." + k: v for k, v in state.items()}, path)
    else:
        save_file(state, str(path))
    loaded = load_tower(TeacherConfig(path=str(path), num_heads=2))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(images), tower.forward_features(images), atol=1e-5)
        assert torch.allclose(loaded(images), tower(images), atol=1e-5)


def test_teacher_errors_name_the_config_key(clip_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"^method.teacher.path: teacher weights not found: /no/clip.bin$"):
        load_config(None, ["method.name=digpt", "train.steps=1", "method.teacher.path=/no/clip.bin"])
    with pytest.raises(ConfigError, match=r"^method.teacher.path is empty"):
        load_config(None, ["method.name=mapet", "train.steps=1"])
    with pytest.raises(ConfigError, match=r"method.teacher.model: unknown timm architecture 'vit_clip'"):
        TeacherConfig(path=str(clip_teacher), model="vit_clip").validate()
    # weights of a CLIP tower (pre-norm) into a plain ViT, or a head count that does not divide the width
    with pytest.raises(ConfigError, match=r"does not fit architecture vit_base_patch16_224.*norm_pre"):
        load_tower(TeacherConfig(path=str(clip_teacher), model="vit_base_patch16_224", num_heads=2))
    with pytest.raises(ConfigError, match=r"does not fit architecture vit_base_patch16_clip_224 .*num_heads"):
        load_tower(TeacherConfig(path=str(clip_teacher), num_heads=5))
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"method.teacher.path: cannot read .*notes.pt"):
        load_tower(TeacherConfig(path=str(garbage), num_heads=2))


def test_frozen_teacher_renormalises_projects_and_aligns(clip_teacher):
    data_mean, data_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = TeacherConfig(path=str(clip_teacher), num_heads=2)
    teacher = FrozenTeacher(cfg, (4, 4), data_mean, data_std)
    tower = load_tower(cfg)
    assert teacher.out_dim == 24
    images = torch.randn(2, 3, 16, 16)
    cls, patches = teacher(images)
    # by hand: undo the data normalisation, apply CLIP's, run the tower, project every token
    raw = images * torch.tensor(data_std).view(3, 1, 1) + torch.tensor(data_mean).view(3, 1, 1)
    clip_input = (raw - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
    with torch.no_grad():
        tokens = tower.head(tower.forward_features(clip_input))
    assert cls.shape == (2, 24) and patches.shape == (2, 16, 24)
    assert torch.allclose(cls, tokens[:, 0], atol=1e-5) and torch.allclose(patches, tokens[:, 1:], atol=1e-5)
    # the tower at 32 px (8x8 grid, position embeddings resampled) onto a 4x4 student grid
    big = FrozenTeacher(TeacherConfig(path=str(clip_teacher), num_heads=2, img_size=32, project=False), (4, 4),
                        data_mean, data_std)
    assert big.out_dim == 32 and big.model.patch_embed.grid_size == (8, 8)
    assert big(images)[1].shape == (2, 16, 32)


def test_align_to_grid_resamples_at_patch_centres():
    # a 16x16 teacher grid whose features are the (row, column) coordinates onto a 14x14 student grid: bilinear
    # resampling of a linear map is exact, each student patch centre i falls at (i + 0.5) * 16 / 14 - 0.5
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    teacher = torch.stack([rows, cols], dim=-1).view(1, 256, 2)
    student = align_to_grid(teacher, (16, 16), (14, 14)).view(14, 14, 2)
    centres = (torch.arange(14.0) + 0.5) * 16 / 14 - 0.5
    assert torch.allclose(student[..., 0], centres[:, None].expand(14, 14), atol=1e-5)
    assert torch.allclose(student[..., 1], centres[None, :].expand(14, 14), atol=1e-5)
    assert align_to_grid(teacher, (16, 16), (16, 16)) is teacher


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 3])
def test_a_pretrained_encoder_exported_as_a_teacher(make_cfg, tmp_path, stage):
    from helpers import fully_partitioned_zero3
    from train.models.ema import gathered
    from train.teachers.export import export_encoder

    ds = fully_partitioned_zero3(tmp_path) if stage == 3 else "ds_configs/zero1.json"
    cfg = make_cfg("train.steps=2", f"train.deepspeed={ds}", name=f"mae_z{stage}")
    encoder = train(cfg, build_method).engine.module.encoder
    meta = export_encoder(cfg.output_dir, tmp_path / "teacher.pth")
    assert meta["model"]["num_heads"] == 2
    teacher = load_tower(TeacherConfig(path=str(tmp_path / "teacher.pth"), model="vit_base_patch16_224",
                                       num_heads=2))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), gathered(list(encoder.parameters())):
        assert torch.allclose(teacher.forward_features(images), encoder.eval()(images), atol=1e-5)


@pytest.mark.parametrize("config", ["mapet_demo", "mapet_vit_b", "mapet_vit_l", "digpt_demo", "digpt_vit_b",
                                    "digpt_vit_l"])
def test_shipped_configs_are_valid(config, clip_teacher):
    from helpers import REPO

    cfg = load_config(REPO / "train" / "configs" / f"{config}.yaml", [f"method.teacher.path={clip_teacher}"])
    assert cfg.method.name == config.split("_")[0] and cfg.run.name == config


@pytest.mark.e2e
def test_finetuned_demo_teacher_learns_and_loads(make_cfg, tmp_path):
    """The demo's stand-in CLIP: the finetune method from a random encoder, then exported as a teacher file."""
    from train.eval.metrics import evaluate_classifier
    from train.teachers.export import export_encoder

    cfg = make_cfg("method.name=finetune", "method.pool=token", "data.views=finetune", "data.rand_augment=",
                   "method.mixup=0", "method.cutmix=0", "method.random_erase=0", "method.label_smoothing=0",
                   "method.head_init_std=0.1",
                   "train.steps=150", "data.batch_size=32", "optim.base_lr=2.4e-2", "optim.warmup_steps=15",
                   "optim.betas=[0.9,0.999]", "run.log_every=100", "run.ckpt_every=100", name="demo_teacher")
    module = train(cfg, build_method).engine.module
    accuracy = evaluate_classifier(module, cfg.data.val, cfg.model.img_size, cfg.data.mean, cfg.data.std)["top1"]
    assert accuracy > 30.0  # ten digit classes: chance is 10%
    export_encoder(cfg.output_dir, tmp_path / "teacher.pth")
    tower = load_tower(TeacherConfig(path=str(tmp_path / "teacher.pth"), model="vit_base_patch16_224", num_heads=2))
    assert tower.embed_dim == 32 and len(tower.blocks) == 2
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tower.forward_features(images), module.encoder.eval()(images), atol=1e-5)


# ------------------------------------------------------------------------------ CLIP ResNet (MaPeT's k-CLIP)

def openai_resnet_layer4(state: dict, x: torch.Tensor) -> torch.Tensor:
    """openai/CLIP's ModifiedResNet up to layer4 (MaPeT's `intermediate_features`), written out from its
    definition on the `visual.*` weights: 3-conv stem + avgpool 2; Bottleneck = conv1 1x1, conv2 3x3,
    avgpool(stride), conv3 1x1 (+ downsample: avgpool(stride), conv 1x1, bn), relu after the sum."""
    def bn(name, t):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], False, 0.0, 1e-5)

    v = "visual."
    x = F.relu(bn(v + "bn1", F.conv2d(x, state[v + "conv1.weight"], stride=2, padding=1)))
    x = F.relu(bn(v + "bn2", F.conv2d(x, state[v + "conv2.weight"], padding=1)))
    x = F.avg_pool2d(F.relu(bn(v + "bn3", F.conv2d(x, state[v + "conv3.weight"], padding=1))), 2)
    for layer in range(1, 5):
        for block in sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{v}layer{layer}.")}):
            p = f"{v}layer{layer}.{block}."
            stride = 2 if layer > 1 and block == 0 else 1
            out = F.relu(bn(p + "bn1", F.conv2d(x, state[p + "conv1.weight"])))
            out = F.relu(bn(p + "bn2", F.conv2d(out, state[p + "conv2.weight"], padding=1)))
            out = bn(p + "bn3", F.conv2d(F.avg_pool2d(out, stride) if stride > 1 else out, state[p + "conv3.weight"]))
            if p + "downsample.0.weight" in state:
                pooled = F.avg_pool2d(x, stride) if stride > 1 else x
                x = bn(p + "downsample.1", F.conv2d(pooled, state[p + "downsample.0.weight"]))
            x = F.relu(out + x)
    return x


@pytest.fixture(scope="module")
def resnet_clip(tmp_path_factory):
    """(OpenAI-named weights, file) of a tiny randomly initialised ResNet-CLIP of RN50x64's structure."""
    torch.manual_seed(0)
    state = timm_to_openai_resnet(tiny_resnet_clip().state_dict())
    path = tmp_path_factory.mktemp("rn") / "RN-tiny.pt"
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("fmt", ["openai", "openai_torchscript", "timm"])
def test_resnet_teacher_is_openais_modified_resnet_up_to_layer4(resnet_clip, tmp_path, fmt):
    state, path = resnet_clip
    if fmt == "openai_torchscript":
        path = tmp_path / "RN-tiny-jit.pt"
        torchscript_archive(state, path)
    elif fmt == "timm":
        path = tmp_path / "rn.pth"
        torch.save(tiny_resnet_clip_state(), path)
    tower = load_tower(TeacherConfig(path=str(path), model="resnet50x64_clip"))
    assert tower.input_size == 448 and tower.num_features == 256  # read from the attention pool / last stage
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    images = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        ours = tower.forward_features(images)
        reference = openai_resnet_layer4(state, images)
    assert ours.shape == (2, 256, 14, 14)  # output stride 32: a 14 x 14 grid at 448 px, as RN50x64's 4096 x 14 x 14
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def tiny_resnet_clip_state() -> dict:
    torch.manual_seed(0)  # the same weights as the fixture's, under timm's names
    return tiny_resnet_clip().state_dict()


def test_resnet_teacher_errors_name_the_architecture(resnet_clip, tmp_path):
    _, path = resnet_clip
    with pytest.raises(ConfigError, match=r"holds a CLIP ResNet; set method.teacher.model .*resnet50x64_clip"):
        load_tower(TeacherConfig(path=str(path)))  # the default ViT architecture
    trunk = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in tiny_resnet_clip_state().items() if not k.startswith("head.")}, trunk)
    with pytest.raises(ConfigError, match=r"method.teacher.img_size: .* set it \(448 for RN50x64\)"):
        load_tower(TeacherConfig(path=str(trunk), model="resnet50x64_clip"))
    assert load_tower(TeacherConfig(path=str(trunk), model="resnet50x64_clip", img_size=448)).input_size == 448


def test_kclip_tokenizer_from_a_resnet_clip_gives_a_14x14_grid_of_codes(resnet_clip):
    state, path = resnet_clip
    data_mean, data_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = FrozenTeacher(TeacherConfig(path=str(path), model="resnet50x64_clip"), (14, 14), data_mean, data_std)
    assert teacher.out_dim == 256 and teacher.native_grid == (14, 14) and teacher.forward_flops() > 0
    torch.manual_seed(0)
    images = torch.randn(3, 3, 448, 448)  # normalised with the data's mean/std, as batches arrive
    _, patches = teacher(images)
    raw = images * torch.tensor(data_std).view(3, 1, 1) + torch.tensor(data_mean).view(3, 1, 1)
    clip_input = (raw - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        expected = openai_resnet_layer4(state, clip_input).flatten(2).transpose(1, 2)
    assert patches.shape == (3, 196, 256) and torch.allclose(patches, expected, atol=1e-4)
    # the codebook fit (best of 3 restarts) is deterministic given the seed, and the seed matters
    feats = patches.flatten(0, 1)
    first, mse = kmeans(feats, 16, iters=5, seed=7, restarts=3)
    again, mse_again = kmeans(feats, 16, iters=5, seed=7, restarts=3)
    other, _ = kmeans(feats, 16, iters=5, seed=50, restarts=3)  # runs 50-52: none shared with 7-9
    assert torch.equal(first, again) and mse == mse_again and not torch.equal(first, other)
    assert mse <= min(kmeans(feats, 16, iters=5, seed=s)[1] for s in (7, 8, 9))  # the best of its runs
    codes = KCLIPTokenizer(teacher, first)(images)
    assert codes.shape == (3, 196) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16
    # the same codes up to near-ties (the tokenizer's batched features differ from these in the last bits)
    assert (codes.view(3, 14, 14).flatten(1) == assign(expected, first)).float().mean() >= 0.97
    # a 224 px student crop is resized to the teacher's 448 px: still a 14 x 14 grid of codes
    assert KCLIPTokenizer(teacher, first)(torch.randn(2, 3, 224, 224)).shape == (2, 196)
