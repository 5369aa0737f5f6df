"""`mor-sr demo` without a browser: every option documented, Gradio imported only by the demo, a clear
message without the [demo] extra, `--model tiny` builds the tiny model when it is missing, and the
temporary folder is removed whatever happens."""

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mor_model.cli import build_parser, main


def demo_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["demo"]


def test_every_option_is_documented():
    parser = demo_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help != "==SUPPRESS==", action.dest
        for flag in action.option_strings:
            assert flag in text, flag
    args = parser.parse_args(["--model", "m"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)  # loopback, never shared by default


@pytest.mark.parametrize("port", ["70000", "-1", "65536", "http"])
def test_a_port_out_of_range_is_a_usage_error(port, capsys):
    with pytest.raises(SystemExit) as e:
        demo_parser().parse_args(["--model", "m", "--port", port])
    assert e.value.code == 2
    assert "--port" in capsys.readouterr().err
    assert demo_parser().parse_args(["--model", "m", "--port", "65535"]).port == 65535
    assert demo_parser().parse_args(["--model", "m", "--port", "0"]).port == 0


def test_gradio_is_imported_by_the_demo_only():
    code = "import sys, mor_model, mor_model.cli, mor_model.demo.engine; print('gradio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_without_gradio_tiny_is_built_and_the_message_says_what_to_install(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = signal.getsignal(signal.SIGTERM)
    assert main(["demo", "--model", "tiny"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the demo's SIGTERM handler is gone with it
    captured = capsys.readouterr()
    assert "building the tiny random model in ./tiny" in captured.out
    assert "pip install 'mor-sr[demo]'" in captured.err
    assert (tmp_path / "tiny" / "unet").is_dir() and (tmp_path / "tiny" / "mor_adapter").is_dir()
    assert list((tmp_path / "tmp").iterdir()) == []  # the demo's temporary folder is gone


def test_a_missing_model_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["demo", "--model", str(Path("org") / "not-here")]) == 2
    assert "not in the cache" in capsys.readouterr().err
