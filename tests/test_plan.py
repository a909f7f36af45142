"""The planner: its memory model against DeepSpeed's accounting and real autograd, its choice, its command."""

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, tiny_overrides
from train.methods import build_method
from train.plan import main
from train.planning import (
    GB,
    Footprint,
    ZeroSetting,
    comm_bytes,
    footprint,
    meta_batch,
    model_states,
    plan,
    saved_tensor_counter,
    traced_activations,
)


def test_model_states_follow_deepspeed_accounting():
    psi, n = 100_000_000, 8
    # bf16 weights 2 + per rank: bf16 grads 2, fp32 grads 4, fp32 master 4, Adam moments 8 (DeepSpeed's 18)
    assert model_states(psi, 0, 0, 2, False, n, grad_fp32=False) == pytest.approx(2 * psi + 18 * psi / n)
    # ZeRO-1 keeps the 16-bit gradients whole
    assert model_states(psi, 0, 0, 1, False, n, grad_fp32=False) == pytest.approx(4 * psi + 16 * psi / n)
    # ZeRO-3 partitions the weights too, one layer gathered at a time (fp32-sized buffer, DeepSpeed's estimate)
    assert model_states(psi, 0, 10**6, 3, False, n, grad_fp32=False) == pytest.approx(4e6 + 18 * psi / n)
    # fp32 gradient accumulation: 2 more bytes a parameter, partitioned from ZeRO-2 on; frozen weights: 16 bit
    assert model_states(psi, 10**7, 0, 1, False, n, grad_fp32=True) - model_states(
        psi, 0, 0, 1, False, n, grad_fp32=False) == pytest.approx(2 * psi + 2e7)
    assert model_states(psi, 0, 0, 2, False, n, grad_fp32=True) - model_states(
        psi, 0, 0, 2, False, n, grad_fp32=False) == pytest.approx(2 * psi / n)


def test_comm_bytes_per_step():
    psi, n, ring = 10**6, 4, 3 / 4
    assert comm_bytes(psi, 1, n, accumulation=4, grad_bytes=4) == pytest.approx((4 + 2) * psi * ring)
    assert comm_bytes(psi, 2, n, accumulation=4, grad_bytes=4) == pytest.approx((4 * 4 + 2) * psi * ring)
    assert comm_bytes(psi, 3, n, accumulation=4, grad_bytes=4) == pytest.approx(4 * (4 + 2 * 2) * psi * ring)
    assert comm_bytes(psi, 3, 1, accumulation=4, grad_bytes=4) == 0


def test_fused_attention_counts_what_flash_attention_saves():
    """q, k, v and the output in bf16 plus the fp32 log-sum-exp, never the (s x s) probabilities."""
    b, h, s, d = 2, 4, 50, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    saved = []
    with saved_tensor_counter({id(q), id(k), id(v)}, saved.append):
        F.scaled_dot_product_attention(q, k, v)
    assert sum(saved) == 4 * b * h * s * d * 2 + b * h * s * 4


def test_meta_trace_matches_real_autograd(make_cfg):
    """The activations traced on the meta device equal those counted on the real CPU forward."""
    cfg = make_cfg("model.depth=3", "train.steps=10")
    traced = footprint(cfg, build_method).activations
    torch.manual_seed(0)
    method = build_method(cfg)
    batch = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_batch(cfg, 2).items()}
    params = {id(p) for p in method.parameters()}
    saved = []
    with saved_tensor_counter(params, saved.append):
        method.train()
        method(batch, 0)
    assert traced == sum(saved) / 2 > 0
    with torch.device("meta"):
        meta = build_method(cfg)
    assert traced_activations(meta, cfg, batch=4)[0] == pytest.approx(traced, rel=1e-3)  # linear in the batch


def real_saved_bytes(method, batch, checkpointing: bool) -> tuple[float, float]:
    """(bytes autograd saves on a real CPU forward (floats at 2 bytes), bytes of the encoder blocks' inputs)."""
    params, seen, saved, inputs = {id(p) for p in method.parameters()}, set(), [], []

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            saved.append(base.numel() * (2 if base.is_floating_point() else base.element_size()))
        return t

    handles = [b.register_forward_pre_hook(lambda _, args: inputs.append(args[0].numel() * 2))
               for b in method.encoder.vit.blocks]
    method.encoder.vit.set_grad_checkpointing(checkpointing)
    method.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method(batch, 0)
    for h in handles:
        h.remove()
    return sum(saved), sum(inputs)


def test_checkpointing_keeps_block_inputs_and_one_block(make_cfg):
    """Against a real checkpointed CPU forward: what stays outside the blocks, their inputs, one block's tensors."""
    depth = 6
    cfg = make_cfg(f"model.depth={depth}", "train.steps=10")
    fp = footprint(cfg, build_method)
    method = build_method(cfg)
    batch = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_batch(cfg, 2).items()}
    eager, _ = real_saved_bytes(method, batch, checkpointing=False)
    stored, inputs = real_saved_bytes(method, batch, checkpointing=True)  # the blocks' inputs are among `stored`
    one_block = (eager - (stored - inputs)) / depth
    # 3%: CPU's attention kernel saves a little less than the fused GPU kernels the planner counts
    assert fp.activations == pytest.approx(eager / 2, rel=0.03)
    assert fp.activations_ckpt == pytest.approx((stored + one_block) / 2, rel=0.03)
    assert fp.activations_ckpt < 0.6 * fp.activations


def tiny_footprint(**kw) -> Footprint:
    base = dict(trainable=10**9, frozen=0, largest_layer=10**7, outside=0.0, activations=0.1 * GB,
                activations_ckpt=0.02 * GB, flops=1e12)
    return Footprint(**{**base, **kw})


def test_plan_picks_the_fastest_setting_that_fits():
    fp = tiny_footprint()  # 1B parameters: 22 GB of states under ZeRO-1/2 on one GPU, 20.04 GB under ZeRO-3
    rows, best = plan(fp, gpus=1, global_batch=512, gpu_memory=80)  # 77 GB usable
    assert best.setting == ZeroSetting(1, False, False) and best.micro_batch == 512  # 22 + 512 x 0.1 GB
    assert {r.setting: r.micro_batch for r in rows}[ZeroSetting(3, False, False)] == 512
    _, best = plan(fp, gpus=1, global_batch=512, gpu_memory=23.5)  # 20.5 GB: only ZeRO-3 leaves room
    assert best.setting == ZeroSetting(3, False, False) and best.micro_batch == 4  # 20.04 + 4 x 0.1 GB
    _, best = plan(tiny_footprint(outside=100 * GB), gpus=8, global_batch=512, gpu_memory=80)
    assert best is None
    with pytest.raises(ValueError, match="not a multiple"):
        plan(fp, gpus=3, global_batch=512, gpu_memory=80)


def test_plan_command(capsys, digits_dir):
    rc = main(["--config", "train/configs/mae_demo.yaml", "--gpus", "2", "--gpu-memory", "16",
               f"data.train={digits_dir / 'train.json'}", f"data.val={digits_dir / 'val.json'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "| zero3_offload + ckpt |" in out
    assert "recommended: zero1, micro-batch" in out and "train.deepspeed=ds_configs/zero1.json" in out
    assert main(["--config", "train/configs/mae_demo.yaml", "model.depthh=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["config error: unknown config key 'model.depthh' "
                                                            "(did you mean 'model.depth'?)"]


def test_readme_table_is_the_planners(capsys):
    """The README's which-ZeRO-config table is what `python -m train.plan --table` prints for the MAE recipes."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- plan table -->\n")[1].split("\n<!-- /plan table -->")[0]
    recipes = [f"train/configs/mae_vit_{size}.yaml" for size in "blh"]
    assert main(["--table", *recipes]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


@pytest.mark.e2e
def test_run_logs_its_plan_and_out_of_memory_is_one_line(tmp_path, digits_dir, monkeypatch, capsys, caplog):
    """The start of a run logs the planner's estimate; running out of GPU memory ends it with the suggestion."""
    from train.methods.mae import MAE
    from train.pretrain import main as pretrain

    args = [*tiny_overrides(), f"run.output_dir={tmp_path / 'run'}", f"data.train={digits_dir / 'train.json'}",
            f"data.val={digits_dir / 'val.json'}", "train.steps=3"]

    forward = MAE.forward

    def oom(self, batch, step):  # the planner's meta-device trace still runs the real forward
        if batch["images"].device.type == "meta":
            return forward(self, batch, step)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MAE, "forward", oom)
    with caplog.at_level("INFO", logger="train"):
        assert pretrain(args) == 2
    assert any(r.getMessage().startswith("plan: expected ") and "per GPU" in r.getMessage() for r in caplog.records)
    err = capsys.readouterr().err.strip().splitlines()
    (line,) = [e for e in err if "out of GPU memory" in e]  # once, as the last line, no traceback
    assert line == err[-1] and not any("Traceback" in e for e in err)
    assert line.startswith("error: out of GPU memory at step 0 (zero1.json, micro-batch 8; planned ")
    assert "the planner suggests zero1 at micro-batch" in line and "python -m train.plan --config" in line
