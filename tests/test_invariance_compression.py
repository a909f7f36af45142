"""Compression (train/compression.py) in MoCo v3, SimCLR and DINO: token dropout on the branch with gradients,
patch scaling on every branch, FLOP/token accounting, and a compressed run with the gradient diagnostic."""

import pytest
import torch

from helpers import read_metrics
from train.compression import Setting
from train.engine import train
from train.methods import build_method


def block_input_tokens(encoder, seen: list) -> None:
    """Record the sequence length (class token included) entering the first block of `encoder`."""
    encoder.vit.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))


@pytest.mark.parametrize("name", ["moco_v3", "simclr", "dino"])
def test_student_drops_tokens_teacher_sees_its_whole_grid(make_cfg, name):
    torch.manual_seed(0)
    cfg = make_cfg(f"method.name={name}", "train.steps=1")
    method = build_method(cfg)
    img, local = cfg.model.img_size, cfg.data.local_size  # 16 px, 4 px patches: 16 patches; local 8 px: 4
    b = 3
    batch = {"views": torch.randn(b, 2, 3, img, img)}
    if name == "dino":
        batch["local_views"] = torch.randn(b, cfg.data.local_crops, 3, local, local)
    student, teacher = [], []
    block_input_tokens(method.encoder, student)
    if hasattr(method, "teacher"):
        block_input_tokens(method.teacher.module["encoder"], teacher)

    # token dropout: half of the 16 patches through the student, all 16 through the teacher
    loss, _ = method({**batch, "compression": Setting(keep_ratio=0.5, seed=1)}, 0)
    assert torch.isfinite(loss)
    assert student == ([1 + 8, 1 + 2] if name == "dino" else [1 + 8])
    assert teacher == ([] if name == "simclr" else [1 + 16])
    # patch scaling: 8 px patches on every branch (2x2 global grid, 1x1 local grid)
    student.clear(), teacher.clear()
    method({**batch, "compression": Setting(patch_size=8)}, 0)
    assert student == ([1 + 4, 1 + 1] if name == "dino" else [1 + 4])
    assert teacher == ([] if name == "simclr" else [1 + 4])

    # accounting follows the same token counts
    full, dropped = method.tokens_per_image(), method.tokens_per_image(compression=Setting(keep_ratio=0.5))
    locals_ = cfg.data.local_crops if name == "dino" else 0
    assert (full, dropped) == (2 * 16 + locals_ * 4, 2 * 8 + locals_ * 2)
    assert method.flops_per_image(compression=Setting(patch_size=8)) < method.flops_per_image()


@pytest.mark.e2e
def test_compressed_dino_run_logs_setting_and_gradient_error(make_cfg):
    """A DINO run on a token-dropout schedule: the engine's compression scalars and the gradient diagnostic
    (which runs the method on a copy, teacher and centre included)."""
    cfg = make_cfg("method.name=dino", "method.freeze_last_layer=0", "train.steps=2",
                   "compression.keep_ratio.kind=step", "compression.keep_ratio.start=0.5",
                   "compression.keep_ratio.until=0.5", "compression.diagnose_every=1")
    train(cfg, build_method)
    rows = read_metrics(cfg.output_dir)
    assert [rows[s]["compression/keep_ratio"] for s in (1, 2)] == pytest.approx([0.5, 1.0])
    assert -1.0 <= rows[1]["compression/grad_cosine"] < 1.0 and rows[1]["compression/grad_rel_error"] > 0


@pytest.mark.parametrize("name", ["moco_v3_vit_b", "dino_vit_b", "simclr_vit_b", "dino_demo"])
def test_shipped_compression_schedules_stack_on_the_recipes(name):
    from helpers import REPO
    from train.recipe import load_config

    configs = REPO / "train" / "configs"
    method = name.split("_vit")[0].removesuffix("_demo")
    gpus = {"moco_v3_vit_b": 64, "simclr_vit_b": 64, "dino_vit_b": 16}.get(name, 1)  # the recipe's global batch
    cfg = load_config([configs / f"{name}.yaml", configs / "compression" / f"{method}.yaml"], world_size=gpus)
    assert cfg.compression.keep_ratio.start < 1 and cfg.compression.patch_scale.start > 1


def test_simclr_token_dropout_on_the_first_view_only(make_cfg):
    """method.dropout_views=first: the first view of every image loses tokens, the second keeps its whole grid."""
    torch.manual_seed(0)
    method = build_method(make_cfg("method.name=simclr", "train.steps=1", "method.dropout_views=first"))
    views = torch.randn(3, 2, 3, 16, 16)
    calls = []
    method.encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0], kwargs["ids_keep"])),
                                         with_kwargs=True)
    half = Setting(keep_ratio=0.5, seed=1)
    loss, _ = method({"views": views, "compression": half})
    (first, ids_first), (second, ids_second) = calls
    assert torch.equal(first, views[:, 0]) and ids_first.shape == (3, 8)  # 8 of 16 patches
    assert torch.equal(second, views[:, 1]) and ids_second is None
    assert torch.isfinite(loss) and method.tokens_per_image(compression=half) == 8 + 16
    torch.manual_seed(0)  # the same weights
    both = build_method(make_cfg("method.name=simclr", "train.steps=1"))
    assert both.tokens_per_image(compression=half) == 8 + 8
    assert both.flops_per_image(compression=half) < method.flops_per_image(compression=half) < method.flops_per_image()
    # full tokens: the two passes are the one-pass forward
    torch.manual_seed(1)
    one_pass, _ = both({"views": views})
    torch.manual_seed(1)
    two_passes, _ = method({"views": views})
    assert torch.allclose(one_pass, two_passes, rtol=1e-5)
