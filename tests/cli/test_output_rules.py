"""Issue 15, the output rules and the usage errors of every subcommand: no output is an input, nothing is
replaced without --overwrite, every problem with the arguments is exit code 2 before any work. Each case
checks the exit code, the message, and that the inputs and earlier outputs are byte-for-byte unchanged."""

import json
import sys

import pytest

pytest.importorskip("PIL.Image", reason="Pillow is not installed")

from cli_helpers import digest_tree, save_photo  # noqa: E402

from mor_model.cli import main  # noqa: E402


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a subcommand gets as far as loading the model."""
    from mor_model.cli import common

    def refuse(args):
        raise AssertionError("the model was loaded, although the arguments were bad")

    for mod in ("upscale", "route_stats"):
        monkeypatch.setattr(f"mor_model.cli.{mod}.load_pipeline", refuse)
    monkeypatch.setattr(common, "load_pipeline", refuse)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_route_stats_outputs_never_replace_inputs(tiny_model_dir, tmp_path, capsys, no_model_loading):
    rs = tmp_path / "rs"
    a, b = save_photo(rs / "a.png"), save_photo(rs / "b.png", seed=1)
    before = digest_tree(rs, tiny_model_dir)
    model = ["--model", tiny_model_dir]
    cases = [
        (["-o", a, "--json", b], "-o", "names an input file"),  # the case
        (["-o", tmp_path / "h.png", "--json", b], "--json", "names an input file"),
        (["-o", a, "--overwrite"], "-o", "names an input file"),  # --overwrite never reaches inputs
        (["-o", tiny_model_dir / "unet" / "config.json", "--overwrite"], "-o", "inside the input"),
        (["-o", tmp_path / "same.json", "--json", tmp_path / "same.json"], "--json", "name the same file"),
        (["-o", rs], "-o", "is a folder"),
        (["-o", a / "x.png"], "-o", "is a file, not a folder"),
    ]
    for extra, flag, message in cases:
        code, err = run(capsys, "route-stats", a, b, *model, *extra)
        assert code == 2, extra
        assert flag in err and message in err, (extra, err)
    assert digest_tree(rs, tiny_model_dir) == before
    assert not (tmp_path / "h.png").exists() and not (tmp_path / "same.json").exists()


def test_route_stats_keeps_existing_outputs_without_overwrite(tiny_model_dir, tmp_path, capsys, no_model_loading):
    a = save_photo(tmp_path / "in" / "a.png")
    heat, js = tmp_path / "heat.png", tmp_path / "stats.json"
    heat.write_bytes(b"an earlier heatmap")
    js.write_text("{}")
    before = digest_tree(tmp_path)
    code, err = run(capsys, "route-stats", a, "--model", tiny_model_dir, "-o", heat, "--json", js)
    assert code == 2 and "exists; pass --overwrite" in err and "-o" in err
    assert digest_tree(tmp_path) == before


def test_route_stats_without_matplotlib_names_the_extra(
    tiny_model_dir, tmp_path, capsys, monkeypatch, no_model_loading
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    a = save_photo(tmp_path / "a.png")
    before = digest_tree(tmp_path)
    code, err = run(capsys, "route-stats", a, "--model", tiny_model_dir, "-o", tmp_path / "heat.png")
    assert code == 2
    assert "matplotlib" in err and "pip install 'mor-sr[model]'" in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line
    assert digest_tree(tmp_path) == before


def test_route_stats_writes_atomically_and_overwrites_on_request(tiny_model_dir, tmp_path, capsys):
    a = save_photo(tmp_path / "in" / "a.png")
    heat, js = tmp_path / "out" / "heat.png", tmp_path / "out" / "stats.json"
    heat.parent.mkdir()
    heat.write_bytes(b"old")
    js.write_text("old")
    inputs = digest_tree(tmp_path / "in")
    code, err = run(capsys, "route-stats", a, "--model", tiny_model_dir, "-o", heat, "--json", js, "--overwrite")
    assert code == 0, err
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and json.loads(js.read_text())["images"] == [str(a)]
    assert sorted(p.name for p in heat.parent.iterdir()) == ["heat.png", "stats.json"]  # no temporary files
    assert digest_tree(tmp_path / "in") == inputs


def test_eval_csv_never_replaces_an_image(tmp_path, capsys):
    ev = tmp_path / "ev"
    save_photo(ev / "gt" / "a.png")
    save_photo(ev / "pred" / "a.png", seed=3)
    before = digest_tree(ev)
    for csv, message in [
        (ev / "gt" / "a.png", "names an input file"),  # the case
        (ev / "pred" / "a.png", "names an input file"),
        (ev / "gt", "is a folder"),
    ]:
        for extra in ([], ["--overwrite"]):
            code, err = run(capsys, "eval", "--pred", ev / "pred", "--gt", ev / "gt", "--csv", csv, *extra)
            assert code == 2 and "--csv" in err and message in err, (csv, extra, err)
    assert digest_tree(ev) == before


def test_eval_keeps_an_existing_csv_without_overwrite(tmp_path, capsys):
    save_photo(tmp_path / "gt" / "a.png", size=(32, 32))
    save_photo(tmp_path / "pred" / "a.png", size=(32, 32), seed=3)
    csv = tmp_path / "m.csv"
    csv.write_text("earlier results\n")
    before = digest_tree(tmp_path)
    code, err = run(capsys, "eval", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--csv", csv)
    assert code == 2 and "exists; pass --overwrite" in err
    assert digest_tree(tmp_path) == before
    code, err = run(capsys, "eval", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--csv", csv, "--overwrite")
    assert code == 0, err
    assert csv.read_text().startswith("name,pred,gt,psnr,ssim")
    assert {p: h for p, h in digest_tree(tmp_path).items() if p != csv} == {p: h for p, h in before.items() if p != csv}


def test_upscale_usage_errors_come_before_the_model(tiny_model_dir, tmp_path, capsys, no_model_loading):
    a = save_photo(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"an earlier output")
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    before = digest_tree(tmp_path, tiny_model_dir)
    base = ["upscale", a, "--model", tiny_model_dir, "-q"]
    cases = [
        (["-o", afile], "-o", "is a file; it needs a folder"),
        (["-o", afile / "sub"], "-o", "is a file, not a folder"),
        (["-o", out, "--suffix", "/../../ESCAPED"], "--suffix", "no path separator"),
        (["-o", out, "--suffix", ".."], "--suffix", "no '..'"),
        (["-o", out, "--scale", "1e9"], "scale", "at most 16"),
        (["-o", out, "--scale", "nan"], "scale", "positive number"),
        (["-o", out, "--device", "meta"], "--device", "cpu or cuda"),
        (["-o", out, "--device", "bogus"], "--device", "not a device name"),
    ]
    for extra, flag, message in cases:
        code, err = run(capsys, *base, *extra)
        assert code == 2, extra
        assert flag in err and message in err, (extra, err)
    assert digest_tree(tmp_path, tiny_model_dir) == before
    assert not (tmp_path / "ESCAPED.png").exists() and not list(tmp_path.parent.glob("ESCAPED*"))


@pytest.mark.parametrize("command", ["route-stats", "eval"])
def test_device_errors_name_the_flag(tiny_model_dir, tmp_path, capsys, command, no_model_loading):
    a = save_photo(tmp_path / "gt" / "a.png")
    save_photo(tmp_path / "pred" / "a.png")
    argv = (
        ["route-stats", a, "--model", tiny_model_dir, "-o", tmp_path / "h.png"]
        if command == "route-stats"
        else ["eval", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt"]
    )
    before = digest_tree(tmp_path)
    for device, message in [("bogus", "not a device name"), ("meta", "cpu or cuda")]:
        code, err = run(capsys, *argv, "--device", device)
        assert code == 2 and f"--device {device!r}" in err and message in err, err
        assert "Expected one of" not in err  # not torch's raw message
    assert digest_tree(tmp_path) == before


def _train_config(tmp_path, model, **changes):
    cfg = {
        "model": str(model),
        "output_dir": str(tmp_path / "run"),
        "data": {"hr": [str(tmp_path / "missing_hr")], "crop_size": 16, "num_workers": 0},
        "losses": {"l2": 1.0},
        "max_steps": 1,
        "cpu": True,
    }
    cfg.update(changes)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def test_train_missing_data_is_one_line_and_check_fails_too(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate", reason="the [train] extra is not installed")
    import mor_model.train.loop as loop

    def no_trainer(*a, **k):
        raise AssertionError("the trainer was built although the data folder is missing")

    monkeypatch.setattr(loop, "Trainer", no_trainer)
    cfg = _train_config(tmp_path, tiny_model_dir)
    before = digest_tree(tmp_path)
    for extra in ([], ["--check"]):
        code, err = run(capsys, "train", cfg, *extra)
        assert code == 2, extra
        assert "data.hr source" in err and "missing_hr" in err and "does not exist" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert digest_tree(tmp_path) == before
    assert not (tmp_path / "run").exists()


def test_train_outputs_never_hold_an_input(tiny_model_dir, tmp_path, capsys):
    hr = save_photo(tmp_path / "run" / "final" / "hr" / "a.png").parent  # data inside output_dir/final
    cfg = _train_config(tmp_path, tiny_model_dir, data={"hr": [str(hr)], "crop_size": 16, "num_workers": 0})
    before = digest_tree(tmp_path)
    for extra in ([], ["--check"], ["--overwrite"]):
        code, err = run(capsys, "train", cfg, *extra)
        assert code == 2, extra
        assert "data.hr" in err and "which this run writes" in err
    assert digest_tree(tmp_path) == before
