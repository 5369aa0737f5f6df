"""Fixtures of the demo tests: one tiny random model per session."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
    pytest.importorskip("open_clip", reason="the [model] extra (open_clip_torch) is not installed")
    from mor_model.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny_demo"))
