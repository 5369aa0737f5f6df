"""mor_model.train: config validation, LPIPS from local weights, a few steps on the tiny model, save and
exact resume, frozen base weights, falling loss on a fixed batch, and agreement with the pipeline.

Runtime on the 2-core CI machine: about a minute (tiny model, 32 px crops, a handful of steps)."""

import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("skimage.data")

from safetensors.torch import load_file  # noqa: E402
from train_helpers import write_config  # noqa: E402

from mor_model.cli.train import CONFIG_HELP  # noqa: E402
from mor_model.cli.train import main as train_main  # noqa: E402
from mor_model.train.checkpoints import OutputDirInUse, checkpoint_dirs  # noqa: E402
from mor_model.train.config import TrainConfig, load_config  # noqa: E402
from mor_model.train.loop import Trainer, build_loss_terms  # noqa: E402
from mor_model.train.losses import LPIPSWeightsError, build_lpips  # noqa: E402
from mor_model.train.model import build_model  # noqa: E402


# -- config -------------------------------------------------------------------------------------------
def test_config_validation_names_the_key(tmp_path, tiny, hr_dir, capsys):
    good = write_config(tmp_path / "good.json", tiny, hr_dir)
    cfg = load_config(good, overrides={"max_steps": 7}, sets=["data.crop_size=64", "losses.lpips=0.5"])
    assert cfg.max_steps == 7 and cfg.data.crop_size == 64 and cfg.losses["lpips"] == 0.5
    assert cfg.output_dir == str(tmp_path / "run")  # relative to the config file
    assert cfg.learning_rate == 5e-5 and cfg.vae_lora_rank == 4 and cfg.lpips.net == "vgg"

    cases = [
        ({"epochs": 3}, ValueError, "unknown key"),
        ({"data": {"crop_size": "big"}}, TypeError, "data.crop_size must be an int"),
        ({"data": {"crop_size": 30}}, ValueError, "multiple of data.scale"),
        ({"mixed_precision": "fp8"}, ValueError, "mixed_precision must be one of"),
        ({"losses": {"l1": 1.0}}, ValueError, "losses key must be one of"),
        ({"mor": {"top_k": 99}}, ValueError, "top_k"),
        ({"lpips": {"net": "squeeze"}}, ValueError, "lpips.net"),
    ]
    for override, exc, match in cases:
        with pytest.raises(exc, match=match):
            load_config(write_config(tmp_path / "bad.json", tiny, hr_dir, **override))
    data = json.loads(good.read_text())
    del data["data"]
    with pytest.raises(ValueError, match="missing required key 'data'"):
        TrainConfig.from_dict(data)
    # the command line turns config errors into exit code 2 with the message
    assert train_main([str(write_config(tmp_path / "bad.json", tiny, hr_dir, batch_size=0))]) == 2
    assert "batch_size must be > 0" in capsys.readouterr().err
    assert train_main([str(tmp_path / "missing.json")]) == 2
    # a crop the model cannot take (tiny model: VAE factor 4 x UNet factor 2 = 8) is refused before training
    assert train_main([str(good), "--set", "data.crop_size=36"]) == 2
    assert "must be a multiple of 8" in capsys.readouterr().err


def test_help_example_spells_out_the_defaults():
    """`mor-sr train --help` shows a config "with every default spelled out": it must be the defaults."""
    import re

    from mor_model.train.config import DataConfig

    text = CONFIG_HELP
    example = json.loads(re.sub(r"#[^\n]*", "", text[text.index("{") : text.rindex("}") + 1]))
    defaults = TrainConfig(model="m", output_dir="o", data=DataConfig(hr=["x"])).to_dict()
    for d in (example, defaults):
        del d["model"], d["output_dir"], d["data"]["hr"]  # required keys: examples, not defaults
    assert example == defaults


def test_yaml_config(tmp_path, tiny, hr_dir):
    pytest.importorskip("yaml")
    text = f"model: {tiny}\noutput_dir: out\ndata:\n  hr: {hr_dir}\n  crop_size: 32\nmax_steps: 5\n"
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.hr == [str(hr_dir)] and cfg.max_steps == 5 and cfg.output_dir == str(tmp_path / "out")


# -- LPIPS ----------------------------------------------------------------------------------------------
def test_lpips_loads_the_local_backbone(alex_weights):
    model = build_lpips("alex", alex_weights)
    saved = torch.load(alex_weights, weights_only=True)
    trunk = model.net.state_dict()
    assert torch.equal(trunk["slice1.0.weight"], saved["features.0.weight"])
    assert torch.equal(trunk["slice5.10.weight"], saved["features.10.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(model(x, x).abs().max()) == 0
    assert float(model(x, x.flip(-1)).min()) > 0


def test_missing_lpips_weights(tmp_path, tiny, hr_dir, capsys):
    with pytest.raises(LPIPSWeightsError, match="backbone_weights"):
        build_lpips("vgg", None)
    with pytest.raises(LPIPSWeightsError, match="does not exist"):
        build_lpips("vgg", tmp_path / "vgg16.pth")
    path = write_config(tmp_path / "c.json", tiny, hr_dir, losses={"lpips": 2.0})
    assert train_main([str(path)]) == 2
    assert "lpips.allow_missing" in capsys.readouterr().err
    # allowed: the run goes on without the LPIPS term and says so
    cfg = load_config(path, sets=["lpips.allow_missing=true"])
    messages = []
    terms = build_loss_terms(cfg, log=messages.append)
    assert [t.name for t in terms] == ["l2", "balance"]
    assert any("WITHOUT the LPIPS loss" in m for m in messages)


# -- the training forward ----------------------------------------------------------------------------------
def test_forward_matches_the_pipeline(tmp_path, tiny, hr_dir):
    from mor_model.sr.pipeline import MoRSRPipeline

    cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir), sets=['vae_adapter="none"'])
    model, params = build_model(cfg, log=lambda m: None)
    assert params and all(k.startswith("unet.") for k in params)
    lq = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred, scores = model(lq)
    pipe = MoRSRPipeline.from_pretrained(tiny, vae_adapter=False, device="cpu")
    ref = pipe(lq, color_fix="none", tile=0)
    assert pred.shape == (2, 3, 32, 32) and scores.shape == (2, 7)
    torch.testing.assert_close((pred + 1) / 2, ref, atol=1e-5, rtol=0)


# -- training ---------------------------------------------------------------------------------------------
def _adapters(run_dir):
    out = {}
    for sub in ("mor_adapter", "vae_encoder_adapter"):
        out.update({f"{sub}/{k}": v for k, v in load_file(str(run_dir / sub / "mor_adapter.safetensors")).items()})
    return out


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_train_save_and_resume_exactly(tmp_path, tiny, hr_dir, alex_weights, one_cpu_thread):
    common = dict(
        batch_size=1,
        gradient_accumulation_steps=2,
        losses={"l2": 1.0, "lpips": 2.0, "balance": 1.0},
        lpips={"net": "alex", "backbone_weights": str(alex_weights)},
        learning_rate=1e-3,
        lr_schedule="warmup",
        warmup_steps=2,
    )
    a = write_config(tmp_path / "a.json", tiny, hr_dir, output_dir="a", keep_checkpoints=1, **common)
    assert train_main([str(a)]) == 0
    run_a = tmp_path / "a"
    assert [d.name for d in checkpoint_dirs(run_a)] == ["step-00000002"]  # keep_checkpoints=1
    ckpt = run_a / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert (ckpt / "optimizer.bin").is_file() and not list(ckpt.glob("model*.safetensors"))  # no base weights
    log_a = _log(run_a)
    assert [r["step"] for r in log_a] == [1, 2]
    for r in log_a:
        assert {"l2", "lpips", "balance", "loss", "lr", "grad_norm", "active_ranks_mean"} <= set(r)
        assert len(r["active_ranks_per_layer"]) == len(json.loads((run_a / "routing_layers.json").read_text()))
    assert [r["lr"] for r in log_a] == [5e-4, 1e-3]  # linear warm-up over 2 steps

    b = write_config(tmp_path / "b.json", tiny, hr_dir, output_dir="b", **common)
    assert train_main([str(b), "--max-steps", "1"]) == 0
    run_b = tmp_path / "b"
    after_one = _adapters(run_b / "final")
    assert train_main([str(b), "--max-steps", "2", "--resume"]) == 0
    log_b = _log(run_b)
    assert [r["step"] for r in log_b] == [1, 2]
    assert [d.name for d in checkpoint_dirs(run_b)] == ["step-00000001", "step-00000002"]
    # the resumed run ends exactly where the uninterrupted one did: weights, lr and losses
    final_a, final_b = _adapters(run_a / "final"), _adapters(run_b / "final")
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k
    assert any(not torch.equal(after_one[k], final_b[k]) for k in final_b)  # step 2 did change the weights
    for ra, rb in zip(log_a, log_b, strict=True):
        assert ra["lr"] == rb["lr"] and ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=0)
    # an explicit checkpoint path resumes too, and nothing is left to do at max_steps
    # the exported adapters (the VAE LoRA included) load into the inference pipeline
    from mor_model.sr.pipeline import MoRSRPipeline

    final = run_a / "final"
    pipe = MoRSRPipeline.from_pretrained(
        tiny, adapter=final / "mor_adapter", vae_adapter=final / "vae_encoder_adapter", device="cpu"
    )
    lora_b = {k: v for k, v in final_a.items() if k.startswith("vae_encoder_adapter/") and k.endswith("lora_b")}
    assert any(v.abs().sum() > 0 for v in lora_b.values())  # the VAE LoRA trained (it starts at zero)
    vae_state = pipe.vae.state_dict()
    for k, v in lora_b.items():
        assert torch.equal(vae_state[k.split("/", 1)[1]], v)
    out = pipe(torch.rand(1, 3, 8, 8), tile=0)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()

    explicit = run_b / "checkpoints" / "step-00000002"
    assert train_main([str(b), "--max-steps", "2", "--resume-from", str(explicit)]) == 0
    assert [r["step"] for r in _log(run_b)] == [1, 2]


def test_one_run_per_output_dir(tmp_path, tiny, hr_dir, capsys):
    """A fresh start in a folder holding another run is refused (its checkpoints would survive pruning and be
    picked by a later --resume); --overwrite deletes the old run first; resuming from an older checkpoint
    while later ones exist is refused too, and with --overwrite only the later ones go."""
    cfg = write_config(tmp_path / "c.json", tiny, hr_dir, output_dir="run", keep_checkpoints=2)
    run = tmp_path / "run"
    assert train_main([str(cfg)]) == 0  # steps 1, 2
    ckpts = lambda: [d.name for d in checkpoint_dirs(run)]  # noqa: E731
    assert ckpts() == ["step-00000001", "step-00000002"]
    log_before = (run / "train_log.jsonl").read_text()
    capsys.readouterr()

    assert train_main([str(cfg), "--max-steps", "1"]) == 2  # fresh start, no --resume, no --overwrite
    err = capsys.readouterr().err
    assert "earlier run" in err and "--resume" in err and "--overwrite" in err
    assert ckpts() == ["step-00000001", "step-00000002"] and (run / "train_log.jsonl").read_text() == log_before
    with pytest.raises(OutputDirInUse):  # the API refuses too
        Trainer(load_config(cfg), log=lambda m: None).train()

    first = run / "checkpoints" / "step-00000001"
    state = lambda step: json.loads((run / "checkpoints" / f"step-0000000{step}" / "trainer_state.json").read_text())  # noqa: E731
    t1, t2 = state(1)["time"], state(2)["time"]
    assert train_main([str(cfg), "--resume-from", str(first)]) == 2
    assert "later checkpoints" in capsys.readouterr().err and ckpts() == ["step-00000001", "step-00000002"]
    assert train_main([str(cfg), "--resume-from", str(first), "--overwrite"]) == 0
    assert ckpts() == ["step-00000001", "step-00000002"]
    assert state(1)["time"] == t1 and state(2)["time"] > t2  # step 2 was deleted and made again
    assert [r["step"] for r in _log(run)] == [1, 2]

    assert train_main([str(cfg), "--max-steps", "1", "--overwrite"]) == 0
    assert ckpts() == ["step-00000001"] and [r["step"] for r in _log(run)] == [1]
    assert (run / "final" / "mor_adapter").is_dir()


def test_only_adapters_train_and_the_loss_falls(tmp_path, tiny, hr_dir):
    from mor_model.train.losses import LossTerm

    path = write_config(
        tmp_path / "c.json",
        tiny,
        hr_dir,
        learning_rate=3e-3,
        max_grad_norm=None,
        weight_decay=0.0,
        data={"crop_size": 16},
    )
    seen = []  # an extra term (the GAN/VSD extension point) sees every batch and adds to the total

    def extra(inputs):
        seen.append(tuple(inputs.pred.shape))
        return inputs.pred.new_zeros(())

    extra_terms = [LossTerm("extra", 0.5, extra)]
    trainer = Trainer(load_config(path), log=lambda m: None, extra_terms=extra_terms)
    core = trainer.core
    before = {k: v.clone() for k, v in core.state_dict().items()}
    trainable = {id(p) for p in trainer.params.values()}
    names = {k for k, p in core.named_parameters() if id(p) in trainable}
    assert names == {k for k, p in core.named_parameters() if p.requires_grad}
    assert any(".lora_a" in k for k in names) and any(".router." in k for k in names)
    assert any(k.startswith("vae.encoder.") for k in names) and any(k.startswith("vae.quant_conv.") for k in names)
    assert not any(k.startswith(("vae.decoder", "vae.post_quant_conv", "estimator")) for k in names)

    ds = trainer.dataloader().dataset
    lq, hr = (torch.stack(t) for t in zip(*[ds[i] for i in range(2)], strict=True))
    losses = [trainer.train_step(lq, hr)[0]["l2"] for _ in range(12)]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert seen == [(2, 3, 16, 16)] * 12

    after = core.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "no parameter changed"
    assert changed <= names, sorted(changed - names)[:5]
    assert any(k.startswith("unet.") and k.endswith("lora_b") for k in changed)
    assert any(k.startswith("vae.encoder.") and k.endswith("lora_b") for k in changed)


def test_bf16_mixed_precision_step(tmp_path, tiny, hr_dir):
    """One bf16 autocast step on the CPU: finite losses, adapters updated, adapter weights kept in float32."""
    from accelerate.state import AcceleratorState

    path = write_config(tmp_path / "c.json", tiny, hr_dir, mixed_precision="bf16", cpu=True, data={"crop_size": 16})
    AcceleratorState._reset_state(True)  # the accelerate state is a per-process singleton
    try:
        trainer = Trainer(load_config(path), log=lambda m: None)
        assert trainer.accelerator.mixed_precision == "bf16"
        before = {k: p.detach().clone() for k, p in trainer.params.items()}
        ds = trainer.dataloader().dataset
        lq, hr = (torch.stack(t) for t in zip(*[ds[i] for i in range(2)], strict=True))
        values, _ = trainer.train_step(lq, hr)
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values
        assert all(p.dtype == torch.float32 for p in trainer.params.values())
        assert any(not torch.equal(before[k], p) for k, p in trainer.params.items())
    finally:
        AcceleratorState._reset_state(True)


def test_routed_vae_adapter_is_trained_and_balanced(tmp_path, tiny, hr_dir):
    """vae_adapter 'mor' trains the model's routed VAE-encoder adapter (routers included) and balances it."""
    from mor_model.losses import balance_loss
    from mor_model.train.losses import LossInputs

    cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir, vae_adapter="mor"))
    model, params = build_model(cfg, log=lambda m: None)
    assert any(k.startswith("vae.") and ".router." in k for k in params)
    lq = torch.rand(1, 3, 8, 8)
    pred, scores = model(lq)
    (term,) = [t for t in build_loss_terms(cfg) if t.name == "balance"]
    value = term.fn(LossInputs(pred=pred, hr=pred.detach(), lq=lq, scores=scores, model=model))
    assert torch.equal(value, balance_loss(model)) and not torch.equal(value, balance_loss(model.unet))
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items() if ".router." in k)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny, hr_dir):
    """The UNet's gradient checkpointing recomputes the routing in backward; gradients (balance loss included)
    must not change."""
    from mor_model.losses import balance_loss

    grads = []
    for flag in (False, True):
        cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir, gradient_checkpointing=flag))
        torch.manual_seed(0)  # the fresh VAE LoRA's init
        model, params = build_model(cfg, log=lambda m: None)
        model.train()
        pred, _ = model(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
        (pred.square().mean() + balance_loss(model.unet)).backward()
        grads.append({k: p.grad for k, p in params.items()})
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_a_launcher_precision_the_config_does_not_have_is_refused(tmp_path, tiny, hr_dir, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (ACCELERATE_MIXED_PRECISION) with a config left at "no" would
    silently train in float32: refused, naming mixed_precision. The launcher's "no" (its default) never
    conflicts, and a matching value is fine."""
    from mor_model.train.loop import check_launcher_precision

    path = write_config(tmp_path / "c.json", tiny, hr_dir, output_dir="never")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "mixed_precision 'no'" in err and "ACCELERATE_MIXED_PRECISION" in err and "'bf16'" in err
    assert not (tmp_path / "never").exists()
    check_launcher_precision(load_config(path, sets=["mixed_precision=bf16"]))  # the same: fine
    with pytest.raises(ValueError, match="mixed_precision 'bf16'"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        check_launcher_precision(load_config(path, sets=["mixed_precision=bf16"]))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launcher_precision(load_config(path, sets=["mixed_precision=bf16"]))  # the config decides


def test_each_lr_schedule_waits_only_for_its_own_skipped_step(tmp_path, tiny, hr_dir, monkeypatch):
    """fp16: a loss-scale overflow skips one optimiser's step; only that group's LR schedule is held back."""
    from accelerate.optimizer import AcceleratedOptimizer

    path = write_config(tmp_path / "c.json", tiny, hr_dir, losses="l2,gan", lr_schedule="warmup", warmup_steps=4,
                        data={"crop_size": 16})  # fmt: skip
    trainer = Trainer(load_config(path), log=lambda m: None)
    ds = trainer.dataloader().dataset
    trainer.train_step(*(torch.stack(t) for t in zip(*[ds[i] for i in range(2)], strict=True)))  # both step
    skipped = trainer.optimizers["discriminator"]
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: self is skipped))
    assert trainer.accelerator.optimizer_step_was_skipped  # what held back every schedule before
    trainer._step_schedules()
    steps = {k: s.last_epoch for k, s in trainer.lr_schedulers.items()}
    assert steps == {"generator": 1, "discriminator": 0}


def test_frozen_weights_in_bf16_change_nothing_under_autocast(tmp_path, tiny, hr_dir):
    """mixed_precision bf16 holds the frozen UNet/VAE Linear and Conv2d weights in bf16 (adapters, routers, norms
    stay float32): under bf16 autocast the forward and every trainable gradient are bitwise those of the float32
    model, since autocast rounds those weights to bf16 at each call anyway."""
    from mor_model.losses import balance_loss

    runs = []
    for precision in ("no", "bf16"):
        cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir, mixed_precision=precision, cpu=True))
        torch.manual_seed(0)  # the fresh adapters' init
        model, params = build_model(cfg, log=lambda m: None)
        model.train()
        lq = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, _ = model(lq)
            loss = pred.square().mean() + balance_loss(model.unet)
        loss.backward()
        runs.append((model, params, pred.detach(), {k: p.grad for k, p in params.items()}))
    (fp32_model, fp32_params, fp32_pred, fp32_grads), (model, params, pred, grads) = runs
    assert torch.equal(pred, fp32_pred)
    assert grads.keys() == fp32_grads.keys() and all(g is not None for g in grads.values())
    for k in grads:
        assert torch.equal(grads[k], fp32_grads[k]), k
    trainable = {id(p) for p in params.values()}
    dtypes = {}
    for name, p in model.named_parameters():
        kind = "trainable" if id(p) in trainable else ("matmul" if name.endswith((".weight", ".bias")) else "other")
        dtypes.setdefault(kind, set()).add(p.dtype)
    assert dtypes["trainable"] == {torch.float32}
    conv = model.unet.conv_in.weight
    norm = model.unet.conv_norm_out.weight
    assert conv.dtype == torch.bfloat16 and norm.dtype == torch.float32
    assert model.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.estimator.parameters())  # the CLIP estimator is not cast
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held_fp32 = sum(p.numel() * p.element_size() for p in fp32_model.parameters())
    assert held < held_fp32
