"""The full training objective: VSD (fake-score LoRA psi), the diffusion-feature GAN, the three updates per
step, the one set of frozen weights switched by context managers, save/resume with three optimisers, and
two processes against one.

Runs on one CPU thread (fixture ``one_cpu_thread``): bitwise checks need it, and on a loaded 2-core
machine tiny ops are much faster on one thread than on two.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("skimage.data")

from safetensors.torch import load_file  # noqa: E402
from train_helpers import read_log, write_config  # noqa: E402

from mor_model.cli.train import main as train_main  # noqa: E402
from mor_model.control import adapters_disabled, set_degradation  # noqa: E402
from mor_model.train.config import OSEDIFF_NEGATIVE_PROMPT, load_config  # noqa: E402
from mor_model.train.fake_score import fake_score_mode  # noqa: E402
from mor_model.train.gan import discriminator_loss, generator_loss, unet_features  # noqa: E402
from mor_model.train.loop import Trainer  # noqa: E402
from mor_model.train.losses import LossInputs  # noqa: E402
from mor_model.train.model import build_model  # noqa: E402
from mor_model.train.objective import Objective  # noqa: E402
from mor_model.train.vsd import vsd_gradient, vsd_loss  # noqa: E402

ALL_TERMS = "l2,lpips,vsd,gan,balance"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def full_config(path, tiny, hr_dir, alex_weights, **overrides):
    return write_config(
        path,
        tiny,
        hr_dir,
        losses=ALL_TERMS,
        lpips={"net": "alex", "backbone_weights": str(alex_weights)},  # AlexNet needs 32 px crops at least
        **overrides,
    )


def _batch(trainer, n=2):
    ds = trainer.dataloader().dataset
    return tuple(torch.stack(t) for t in zip(*[ds[i] for i in range(n)], strict=True))


# -- configuration ----------------------------------------------------------------------------------------
def test_losses_by_name_and_bad_objective_configs_stop_before_any_step(tmp_path, tiny, hr_dir, capsys):
    good = write_config(tmp_path / "c.json", tiny, hr_dir)
    cfg = load_config(good, sets=[f"losses={ALL_TERMS}"])
    assert cfg.losses == {"l2": 1.0, "lpips": 2.0, "vsd": 1.0, "gan": 0.5, "balance": 1.0}
    assert (cfg.vsd.t_min, cfg.vsd.t_max, cfg.vsd.guidance_scale, cfg.vsd.lora_rank) == (20, 980, 7.5, 4)
    assert cfg.vsd.negative_prompt == OSEDIFF_NEGATIVE_PROMPT and cfg.gan.loss == "non_saturating"
    assert load_config(good, sets=["losses=l2,gan"]).losses == {"l2": 1.0, "gan": 0.5}  # a GAN without VSD is fine
    cases = [
        (["losses=l2,adversarial"], "losses key must be one of"),
        (["losses.balance=-1"], "losses.balance must be a number >= 0"),
        (["losses=l2,l2"], "names 'l2' twice"),
        (["vsd.t_min=980", "vsd.t_max=20"], r"vsd.t_min \(980\) must be < vsd.t_max \(20\)"),
        (["gan.t_min=500", "gan.t_max=500"], r"gan.t_min \(500\) must be < gan.t_max \(500\)"),
        (["vsd.t_max=1001"], r"vsd.t_max must be in \(0, 1000\]"),
        (["vsd.guidance_scale=-1"], "vsd.guidance_scale must be >= 0"),
        (["vsd.lora_rank=0"], "vsd.lora_rank must be > 0"),
        (["gan.loss=wasserstein"], "gan.loss must be one of"),
        (["gan.learning_rate=-0.1"], "gan.learning_rate must be > 0"),
        (["vsd.negative_prompt=3"], "vsd.negative_prompt must be a string"),
        (["losses=l2,gan", "mixed_precision=fp16", "gradient_accumulation_steps=2"], "mixed_precision 'fp16'"),
    ]
    for sets, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            load_config(good, sets=sets)
        argv = [str(good), "--output-dir", str(tmp_path / "never")]
        for s in sets:
            argv += ["--set", s]
        assert train_main(argv) == 2
        assert match.replace("\\", "").split()[0] in capsys.readouterr().err
        assert not (tmp_path / "never").exists()  # stopped before anything was written or run


# -- one set of frozen weights --------------------------------------------------------------------------
def test_switched_scores_are_real_and_share_the_weights(tmp_path, tiny, hr_dir):
    """The pretrained score (every adapter off) is a clean base UNet's output; the fake score is base + psi;
    leaving the blocks restores the generator, its routing state included."""
    from diffusers import UNet2DConditionModel

    cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir, losses="l2,vsd,balance"))
    model, _ = build_model(cfg, log=lambda m: None)
    objective = Objective(cfg, model)
    unet, psi = model.unet, objective.psi
    clean = UNet2DConditionModel.from_pretrained(tiny / "unet").eval()
    assert sum(p.numel() for p in clean.parameters()) == sum(p.numel() for p in unet.parameters()) - sum(
        p.numel() for n, p in unet.named_parameters() if "lora_" in n or ".router." in n
    )  # no second copy inside the training UNet: only the adapters on top of the base
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    emb = torch.randn(2, 77, 32, generator=g)
    scores = torch.rand(2, 7, generator=g)
    with torch.no_grad():
        set_degradation(unet, scores)
        generator_out = unet(z, t, encoder_hidden_states=emb).sample
        routing = [layer.router.last_probs for layer in _mor_layers(unet)]
        set_degradation(unet, None)  # the pretrained score needs no degradation scores
        with adapters_disabled(unet):
            pretrained = unet(z, t, encoder_hidden_states=emb).sample
        reference = clean(z, t, encoder_hidden_states=emb).sample
        assert torch.equal(pretrained, reference)
        assert (generator_out - reference).abs().max() > 1e-3  # the MoR adapters do change the output
        kept = [layer.router.last_probs for layer in _mor_layers(unet)]
        assert all(a is b for a, b in zip(kept, routing, strict=True))  # the routing of the adapted pass is kept
        with fake_score_mode(unet, psi):
            fake_at_init = unet(z, t, encoder_hidden_states=emb).sample
        assert torch.equal(fake_at_init, reference)  # psi starts with B = 0
        for layer in psi.layers:
            torch.nn.init.normal_(layer.lora_b, std=0.05, generator=g)
        with fake_score_mode(unet, psi):
            fake = unet(z, t, encoder_hidden_states=emb).sample
            with fake_score_mode(unet, psi):  # re-entrant: psi is added once
                nested = unet(z, t, encoder_hidden_states=emb).sample
        assert (fake - reference).abs().max() > 1e-3 and torch.equal(nested, fake)
        set_degradation(unet, scores)
        assert torch.equal(unet(z, t, encoder_hidden_states=emb).sample, generator_out)  # back to base + MoR
    # base weights with folded shared ranks are not the pretrained ones: refused
    import copy

    from mor_model.merge import fold_shared_ranks

    with adapters_disabled(torch.nn.Linear(2, 2)):  # nothing to switch off: a no-op
        pass
    folded = copy.deepcopy(unet)
    fold_shared_ranks(folded)
    with pytest.raises(ValueError, match="folded"):
        with adapters_disabled(folded):
            pass


def _mor_layers(unet):
    from mor_model.layers import mor_layers

    return list(mor_layers(unet).values())


def test_unet_features_are_the_forward_s_down_and_mid_outputs(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny / "unet").eval()
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out[0])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out)))
    g = torch.Generator().manual_seed(0)
    z, emb, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([5, 900])
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=emb)
        for h in hooks:
            h.remove()
        feats = unet_features(unet, z, t, emb)
    assert len(feats) == len(seen) == 3
    for f, s in zip(feats, seen, strict=True):
        assert torch.equal(f, s)


def test_gan_and_vsd_loss_formulas():
    zero = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]
    ln2 = torch.log(torch.tensor(2.0))
    torch.testing.assert_close(generator_loss(zero, "non_saturating"), ln2)
    torch.testing.assert_close(discriminator_loss(zero, zero, "non_saturating"), 2 * ln2)
    torch.testing.assert_close(generator_loss(zero, "hinge"), torch.tensor(0.0))
    torch.testing.assert_close(discriminator_loss(zero, zero, "hinge"), torch.tensor(2.0))
    confident = [torch.full((2, 1, 4, 4), 5.0)]
    assert discriminator_loss(confident, [-c for c in confident], "hinge") == 0  # both beyond the margin
    # the VSD surrogate's gradient on x is exactly grad / numel(x)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    grad = torch.randn(2, 4, 3, 3)
    vsd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-5, atol=1e-9)  # x - (x - grad) rounds


def test_vsd_gradient_vanishes_when_the_scores_agree(tmp_path, tiny, hr_dir):
    """psi starts at zero, so with guidance 1 the fake score equals the pretrained one and the VSD gradient
    is zero; with OSEDiff's guidance 7.5 it is not, and it is finite."""
    cfg = load_config(write_config(tmp_path / "c.json", tiny, hr_dir, losses="l2,vsd"))
    model, _ = build_model(cfg, log=lambda m: None)
    objective = Objective(cfg, model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, noise = torch.tensor([30, 900]), torch.randn(2, 4, 8, 8, generator=g)
    args = (model.unet, objective.psi, x, t, noise, model.prompt_embeds.expand(2, -1, -1))
    kw = dict(alphas_cumprod=model.alphas_cumprod, prediction_type=model.prediction_type)
    neg = model.negative_prompt_embeds.expand(2, -1, -1)
    agree = vsd_gradient(*args, neg, guidance_scale=1.0, **kw)
    assert agree.abs().max() < 1e-4, float(agree.abs().max())
    guided = vsd_gradient(*args, neg, guidance_scale=7.5, **kw)
    assert torch.isfinite(guided).all() and guided.abs().max() > 1e-2


# -- gradients reach exactly their parameters --------------------------------------------------------------
def _phase_grads(trainer, lq, hr, ids):
    """For each generator term, the fake-score loss and the discriminator loss alone: the value and the
    gradients of every trainable parameter (by group) and of every frozen one."""
    core, obj = trainer.model, trainer.objective
    groups = {
        "generator": dict(trainer.params),
        "psi": dict(obj.psi.named_parameters()),
        "heads": dict(obj.heads.named_parameters()),
    }
    trainable = {id(p) for g in groups.values() for p in g.values()}
    frozen = {n: p for n, p in core.named_parameters() if id(p) not in trainable}
    everything = [p for g in groups.values() for p in g.values()] + list(frozen.values())

    def grads():
        out = {g: {n: p.grad for n, p in params.items()} for g, params in groups.items()}
        out["frozen"] = {n: p.grad for n, p in frozen.items()}
        for p in everything:
            p.grad = None
        return out

    results = {}
    core.train()
    for term in trainer.terms:
        pred, scores, latent = core(lq, return_latent=True)
        inputs = LossInputs(pred, hr * 2 - 1, lq, scores, core, {"latent": latent, "ids": ids})
        value = term.fn(inputs)
        value.backward()
        results[term.name] = (value.detach(), grads())
    with torch.no_grad():
        latent = core(lq, return_latent=True)[2]
    with fake_score_mode(core.unet, obj.psi):
        value = obj.fake_score_loss(latent, ids)
        value.backward()
    results["fake_score"] = (value.detach(), grads())
    value, _ = obj.discriminator_loss(latent, hr, ids)
    value.backward()
    results["discriminator"] = (value.detach(), grads())
    return results


def _touched(grads: dict) -> set[str]:
    return {name for name, g in grads.items() if g is not None and g.abs().sum() > 0}


def test_each_term_reaches_exactly_its_parameters(tmp_path, tiny, hr_dir, alex_weights):
    """VSD and GAN: the generator's adapters only (never psi, the heads or a frozen weight); the diffusion
    loss: psi only; the discriminator loss: the heads only. Every value finite. With gradient checkpointing
    the same gradients (the blocks recomputed in backward see the adapter state of their forward)."""
    runs = []
    for checkpointing in (False, True):
        path = full_config(tmp_path / f"c{checkpointing}.json", tiny, hr_dir, alex_weights)
        trainer = Trainer(load_config(path, sets=[f"gradient_checkpointing={str(checkpointing).lower()}"]))
        lq, hr = _batch(trainer)
        for layer in trainer.objective.psi.layers:  # a trained-looking psi, so that A gets gradients too
            torch.nn.init.normal_(layer.lora_b, std=0.05, generator=torch.Generator().manual_seed(3))
        runs.append(_phase_grads(trainer, lq, hr, ids=[0, 1]))
    results = runs[0]
    assert set(results) == {"l2", "lpips", "vsd", "gan", "balance", "fake_score", "discriminator"}
    for name, (value, grads) in results.items():
        assert torch.isfinite(value), name
        assert all(g is None for g in grads["frozen"].values()), name  # frozen weights never get gradients
        for group, params in grads.items():
            assert all(g is None or torch.isfinite(g).all() for g in params.values()), (name, group)
    generator_only = {"l2", "lpips", "vsd", "gan", "balance"}
    for name in generator_only:
        grads = results[name][1]
        assert _touched(grads["generator"]), name
        assert not _touched(grads["psi"]) and not _touched(grads["heads"]), name
    for name in ("vsd", "gan"):  # both reach the UNet's MoR adapters and the VAE-encoder LoRA
        touched = _touched(results[name][1]["generator"])
        assert any(k.startswith("unet.") and "lora_" in k for k in touched), name
        assert any(k.startswith("unet.") and ".router." in k for k in touched), name
        assert any(k.startswith("vae.") for k in touched), name
    psi_grads = results["fake_score"][1]
    assert _touched(psi_grads["psi"]) == set(psi_grads["psi"]) and not _touched(psi_grads["generator"])
    assert not _touched(psi_grads["heads"])
    heads_grads = results["discriminator"][1]
    assert _touched(heads_grads["heads"]) == set(heads_grads["heads"])
    assert not _touched(heads_grads["generator"]) and not _touched(heads_grads["psi"])
    for name in results:  # gradient checkpointing changes nothing
        torch.testing.assert_close(runs[1][name][0], runs[0][name][0], rtol=1e-5, atol=1e-7, msg=name)
        for group in ("generator", "psi", "heads"):
            for k, g in runs[0][name][1][group].items():
                other = runs[1][name][1][group][k]
                assert (g is None) == (other is None), (name, group, k)
                if g is not None:
                    torch.testing.assert_close(other, g, rtol=1e-4, atol=1e-7, msg=f"{name} {group} {k}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def test_todays_l2_lpips_mode_reproduces_todays_losses(tmp_path, tiny, hr_dir, alex_weights):
    """L2 + LPIPS + balance through the new trainer equals, step for step, the plain loop the trainer ran
    before the VSD/GAN objective existed: forward, weighted sum, backward, clip, one AdamW step."""
    from accelerate.utils import set_seed

    from mor_model.losses import balance_loss
    from mor_model.train.losses import build_lpips

    path = write_config(
        tmp_path / "c.json",
        tiny,
        hr_dir,
        losses={"l2": 1.0, "lpips": 2.0, "balance": 1.0},
        lpips={"net": "alex", "backbone_weights": str(alex_weights)},
        learning_rate=1e-3,
    )
    cfg = load_config(path)
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.objective is None and list(trainer.optimizers) == ["generator"]
    ds = trainer.dataloader().dataset
    batches = [tuple(torch.stack(t) for t in zip(*[ds[i] for i in (2 * s, 2 * s + 1)], strict=True)) for s in range(3)]
    new = [trainer.train_step(lq, hr)[0] for lq, hr in batches]

    set_seed(cfg.seed)
    model, params = build_model(cfg, log=lambda m: None)
    lpips = build_lpips("alex", alex_weights)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    model.train()
    for (lq, hr), got in zip(batches, new, strict=True):
        pred, scores = model(lq)
        hr = hr * 2 - 1
        l2 = torch.nn.functional.mse_loss(pred, hr)
        lp = lpips(pred, hr).mean()
        bal = balance_loss(model.unet)
        terms = {"l2": l2, "lpips": lp, "balance": bal}
        loss = None
        for name, weight in cfg.losses.items():  # summed in the config's order, as the trainer does
            loss = weight * terms[name] if loss is None else loss + weight * terms[name]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        expected = tuple(float(v.detach()) for v in (l2, lp, bal, loss))
        assert (got["l2"], got["lpips"], got["balance"], got["loss"]) == expected


# -- training, checkpoints, resume ------------------------------------------------------------------------
def test_full_objective_trains_logs_every_term_and_resumes_exactly(tmp_path, tiny, hr_dir, alex_weights):
    common = dict(
        batch_size=1,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        vsd={"learning_rate": 2e-3},
        gan={"learning_rate": 5e-4, "loss": "hinge"},
        lr_schedule="warmup",
        warmup_steps=2,
    )
    a = full_config(tmp_path / "a.json", tiny, hr_dir, alex_weights, output_dir="a", **common)
    trainer = Trainer(load_config(a), log=lambda m: None)
    frozen = {k: _digest(v) for k, v in trainer.model.state_dict().items() if k not in trainer.params}
    trainer.train()
    after = trainer.model.state_dict()
    assert {k: _digest(after[k]) for k in frozen} == frozen  # the frozen weights never change
    run_a = tmp_path / "a"
    log_a = read_log(run_a)
    assert [r["step"] for r in log_a] == [1, 2]
    keys = {"l2", "lpips", "vsd", "gan", "balance", "fake_score", "discriminator", "d_real", "d_fake", "loss"}
    keys |= {"lr", "lr_fake_score", "lr_discriminator", "grad_norm", "grad_norm_fake_score"}
    keys |= {"grad_norm_discriminator", "peak_memory_mb"}
    for r in log_a:
        assert keys <= set(r), keys - set(r)
        assert all(isinstance(r[k], float) and torch.isfinite(torch.tensor(r[k])) for k in keys)
        assert r["peak_memory_mb"] > 0
    assert [(r["lr"], r["lr_fake_score"], r["lr_discriminator"]) for r in log_a] == [
        (5e-4, 1e-3, 2.5e-4),
        (1e-3, 2e-3, 5e-4),
    ]  # each optimiser its own rate, all on the warm-up schedule
    ckpt = run_a / "checkpoints" / "step-00000002"
    for name in ("optimizer.bin", "optimizer_1.bin", "optimizer_2.bin"):
        assert (ckpt / name).is_file(), name
    psi1 = load_file(str(run_a / "checkpoints" / "step-00000001" / "fake_score_lora.safetensors"))
    psi2 = load_file(str(ckpt / "fake_score_lora.safetensors"))
    heads1 = load_file(str(run_a / "checkpoints" / "step-00000001" / "discriminator_heads.safetensors"))
    heads2 = load_file(str(ckpt / "discriminator_heads.safetensors"))
    assert any(not torch.equal(psi1[k], psi2[k]) for k in psi2) and any(
        not torch.equal(heads1[k], heads2[k]) for k in heads2
    )

    b = full_config(tmp_path / "b.json", tiny, hr_dir, alex_weights, output_dir="b", **common)
    assert train_main([str(b), "--max-steps", "1"]) == 0
    assert train_main([str(b), "--max-steps", "2", "--resume"]) == 0
    run_b = tmp_path / "b"
    for ra, rb in zip(log_a, read_log(run_b), strict=True):
        assert {k: ra[k] for k in keys - {"peak_memory_mb"}} == {k: rb[k] for k in keys - {"peak_memory_mb"}}
    ckpt_b = run_b / "checkpoints" / "step-00000002"
    for name in (
        "fake_score_lora.safetensors",
        "discriminator_heads.safetensors",
        "mor_adapter/mor_adapter.safetensors",
    ):
        sa, sb = load_file(str(ckpt / name)), load_file(str(ckpt_b / name))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    # resuming with another set of terms would pair psi / the heads with the wrong optimisers: refused first
    assert train_main([str(b), "--max-steps", "3", "--resume", "--set", "losses=l2,lpips,gan,balance"]) == 2


def test_gan_without_vsd_and_vsd_without_gan(tmp_path, tiny, hr_dir):
    for losses, has_psi, has_heads in (("l2,gan", False, True), ("l2,vsd", True, False)):
        path = write_config(tmp_path / "c.json", tiny, hr_dir, losses=losses, data={"crop_size": 16})
        trainer = Trainer(load_config(path), log=lambda m: None)
        assert (trainer.objective.psi is not None, trainer.objective.heads is not None) == (has_psi, has_heads)
        values, norms = trainer.train_step(*_batch(trainer))
        assert ("fake_score" in values) == has_psi and ("discriminator" in values) == has_heads
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values())


def test_full_objective_under_bf16_autocast_with_checkpointing(tmp_path, tiny, hr_dir, alex_weights):
    """bf16 autocast, gradient checkpointing and accumulation together: finite terms, every group steps
    once the window is complete, adapters / psi / heads stay float32."""
    from accelerate.state import AcceleratorState

    path = full_config(
        tmp_path / "c.json", tiny, hr_dir, alex_weights, mixed_precision="bf16", cpu=True, gradient_checkpointing=True
    )
    AcceleratorState._reset_state(True)  # the accelerate state is a per-process singleton
    try:
        trainer = Trainer(load_config(path, sets=["gradient_accumulation_steps=2"]), log=lambda m: None)
        assert trainer.accelerator.mixed_precision == "bf16"
        groups = trainer.param_groups
        before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}
        lq, hr = _batch(trainer)
        values, norms = trainer.train_step(lq, hr)
        assert all(v is None for v in norms.values())  # mid-window: nothing stepped
        assert all(torch.equal(a, p) for k, ps in groups.items() for a, p in zip(before[k], ps, strict=True))
        values, norms = trainer.train_step(lq, hr)
        assert set(norms) == {"grad_norm", "grad_norm_fake_score", "grad_norm_discriminator"}
        assert all(torch.isfinite(torch.tensor(v)) for v in [*values.values(), *norms.values()]), (values, norms)
        for k, ps in groups.items():
            assert all(p.dtype == torch.float32 for p in ps), k
            assert any(not torch.equal(a, p) for a, p in zip(before[k], ps, strict=True)), k
    finally:
        AcceleratorState._reset_state(True)


# -- two processes ----------------------------------------------------------------------------------------
def _close(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal within float tolerance, per tensor: batch-1 and batch-2 passes round differently (measured here:
    gradients within 3e-5 of their tensor's largest entry, parameter steps within 2e-8 absolute)."""
    return bool((x - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, tiny, hr_dir, alex_weights):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo), batch 1 per process, against one
    process with batch 2 (the same global batch, the same samples): after one step (two accumulated
    micro-steps) every trainable tensor is identical on both processes and equal to the one-process run
    within float tolerance, and so are the gradients each optimiser stepped with. Every loss term is on,
    the balance loss counting its selections over both processes. AdamW's epsilon is 1 here so that the
    first step is close to ``lr * grad`` (with 1e-8 it is ``lr * sign(grad)``, where float noise in a
    near-zero gradient flips whole steps); clipping stays on (its norm comes from the averaged gradients)."""
    common = dict(max_steps=1, gradient_accumulation_steps=2, adam_epsilon=1.0, learning_rate=1e-2)
    one = full_config(tmp_path / "one.json", tiny, hr_dir, alex_weights, output_dir="one", batch_size=2, **common)
    two = full_config(tmp_path / "two.json", tiny, hr_dir, alex_weights, output_dir="two", batch_size=1, **common)
    driver = Path(__file__).with_name("two_process_driver.py")
    (tmp_path / "out2").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(driver), str(two), str(tmp_path / "out2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "out2" / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    sys.path.insert(0, str(driver.parent))
    import two_process_driver

    (tmp_path / "out1").mkdir()
    single = two_process_driver.run(str(one), str(tmp_path / "out1"))
    assert single["world"] == 1

    assert len(single["grads"]) == len(ranks[0]["grads"]) == 3  # generator, fake score, discriminator
    for group in ("generator", "fake_score", "discriminator"):
        for p0, p1 in zip(ranks[0]["after"][group], ranks[1]["after"][group], strict=True):
            assert torch.equal(p0, p1), group  # identical on both processes
        moved = 0
        for b, a, ref_b, ref_a in zip(
            ranks[0]["before"][group],
            ranks[0]["after"][group],
            single["before"][group],
            single["after"][group],
            strict=True,
        ):
            assert torch.equal(b, ref_b), group  # the same start
            assert _close(a - b, ref_a - ref_b), group
            moved += int((a != b).sum())
        assert moved > 0, group
    for g0, g1, gs in zip(ranks[0]["grads"], ranks[1]["grads"], single["grads"], strict=True):
        for x0, x1, xs in zip(g0, g1, gs, strict=True):
            assert (x0 is None) == (x1 is None) == (xs is None)
            if x0 is not None:
                assert torch.equal(x0, x1) and _close(x0, xs)
    log = read_log(tmp_path / "two")  # one process wrote the log and the checkpoint
    assert [r["step"] for r in log] == [1] and (tmp_path / "two" / "checkpoints" / "step-00000001").is_dir()
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["batch_size"] == 1


def test_balance_loss_refuses_processes_that_routed_different_layers(tmp_path):
    """Two gloo processes: when both routed the same layers the loss is the same on both; when one routed fewer,
    each gets a RuntimeError naming the counts (before: all-reduces of different sizes, on which gloo aborted the
    process here, and NCCL can wait forever)."""
    driver = Path(__file__).with_name("balance_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    outputs = {}
    for mode in ("same", "differ"):
        init = tmp_path / f"init-{mode}"
        procs = [subprocess.Popen([sys.executable, str(driver), str(r), "2", str(init), mode], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
        outputs[mode] = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
            outputs[mode].append(out.strip().splitlines()[-1])
    same = outputs["same"]
    assert same[0].startswith("loss ") and same[0] == same[1]
    for line in outputs["differ"]:
        assert line.startswith("error ") and "same MoR layers" in line and "between 1 and 2 of 2 layers" in line


def test_resume_with_other_trained_shapes_is_refused_by_name(tmp_path, tiny, hr_dir, capsys):
    """A checkpoint whose psi rank or head width differs from the config's: `mor-sr train --resume` stops with
    one line naming the key, before the model loads (before: a raw shape error inside accelerate's load_state)."""
    path = write_config(tmp_path / "c.json", tiny, hr_dir, losses="l2,vsd,gan", max_steps=1, data={"crop_size": 16})
    assert train_main([str(path)]) == 0
    capsys.readouterr()
    for key, value in (("vsd.lora_rank", 2), ("gan.head_channels", 64), ("vae_lora_rank", 8)):
        assert train_main([str(path), "--max-steps", "2", "--resume", "--set", f"{key}={value}"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"{key} " in err and "does not fit this run" in err, err
    assert train_main([str(path), "--max-steps", "2", "--resume", "--set", "gan.learning_rate=1e-4"]) == 0
