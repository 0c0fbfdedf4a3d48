"""The llama.cpp runtime build: version marker and patch application (no compiling here)."""
from __future__ import annotations

import re
import tarfile

import pytest

from flexiedge.errors import FlexiEdgeError
from flexiedge.runtimes.llamacpp import build

PATCHED_FILES = ["ggml/src/gguf.cpp", "src/llama-model-loader.cpp", "src/models/llama.cpp"]


def test_version_marker_names_the_patch():
    v = build.patched_version()
    assert re.fullmatch(rf"{re.escape(build.LLAMA_CPP_PYTHON)}\+flexiedge\.[0-9a-f]{{8}}", v)
    status = build.runtime_status()
    assert status.ok == (build.installed_version() == v)
    assert status.ok or "python -m flexiedge.runtimes.llamacpp.build" in status.reason


def test_patch_touches_only_the_expected_files():
    text = build.PATCH.read_text()
    touched = re.findall(r"^\+\+\+ b/vendor/llama\.cpp/(\S+)", text, flags=re.M)
    assert touched == PATCHED_FILES
    assert not re.search(r"^-[^-]", text, flags=re.M)  # additions only: stock code paths stay as they were


def _sdist_subset(tmp_path):
    """Extract just the files the patch touches from the cached sdist (skip when it is not cached)."""
    sdist = build.cache_dir("llamacpp") / f"llama_cpp_python-{build.LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        pytest.skip(f"{sdist} not cached (python -m flexiedge.runtimes.llamacpp.build downloads it)")
    top = f"llama_cpp_python-{build.LLAMA_CPP_PYTHON}"
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, members=[tar.getmember(f"{top}/vendor/llama.cpp/{f}") for f in PATCHED_FILES],
                       filter="data")
    return tmp_path / top


def test_patch_applies_to_the_sdist(tmp_path):
    src = _sdist_subset(tmp_path)
    build.apply_patch(src)
    assert "layer.attn_post_norm" in (src / "vendor/llama.cpp/src/models/llama.cpp").read_text()


def test_patch_that_does_not_apply_is_a_one_line_error(tmp_path):
    src = _sdist_subset(tmp_path)
    (src / "vendor/llama.cpp/ggml/src/gguf.cpp").write_text("// not the file the patch expects\n")
    before = (src / "vendor/llama.cpp/src/models/llama.cpp").read_text()
    with pytest.raises(FlexiEdgeError, match="does not apply") as e:
        build.apply_patch(src)
    assert "\n" not in str(e.value)
    assert (src / "vendor/llama.cpp/src/models/llama.cpp").read_text() == before  # dry run first: untouched
