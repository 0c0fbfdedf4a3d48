"""Device profiles: every built-in loads; a user's file loads; unknown names and malformed files fail in one line."""

from __future__ import annotations

import re

import pytest

from flexiedge.devices.profiles import known_profiles, load_profile, load_profiles
from flexiedge.errors import FlexiEdgeError

GOOD = """
name = "my-board"
threads = 4
[memory]
bandwidth_gbps = 20
bandwidth_source = "datasheet"
ram_gib = 4
ram_budget_gib = 2
[compute]
gflops = 30
gflops_source = "guess"
[efficiency]
llamacpp = 0.5
source = "guess"
"""

BUILTINS = ["host", "laptop-x86-avx2", "laptop-apple-m2", "phone-snapdragon-8gen3", "phone-apple-a17pro",
            "phone-midrange-android", "rpi5"]


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_profile_loads_with_sourced_numbers(name):
    p = load_profile(name)
    assert p.name == name and p.threads >= 1 and p.bandwidth_gbps > 0
    assert p.bandwidth_source and p.gflops_source and p.efficiency_source  # every number says where it is from
    assert p.measured == (name == "host")  # only this machine is measured


def test_all_expands_to_every_known_profile():
    assert sorted(p.name for p in load_profiles(["all"])) == sorted(known_profiles()) == sorted(BUILTINS)


def test_user_profile_by_path_and_by_profiles_dir(tmp_path):
    (tmp_path / "my-board.toml").write_text(GOOD)
    assert load_profile(str(tmp_path / "my-board.toml")).bandwidth_gbps == 20
    p = load_profile("my-board", profiles_dir=tmp_path)
    assert p.efficiency == {"llamacpp": 0.5} and p.ram_budget_bytes == 2 * 2**30
    assert "my-board" in known_profiles(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("name = ", "malformed TOML"),                                                    # not TOML at all
    (GOOD.replace("threads = 4", 'threads = "four"'), "expected `threads` (int)"),    # wrong type
    (GOOD.replace("threads = 4", "threads = true"), "expected `threads` (int)"),      # bool is not an int
    (GOOD.replace("bandwidth_gbps = 20\n", ""), "expected `memory.bandwidth_gbps`"),  # missing key
    (GOOD.replace("llamacpp = 0.5", "llamacpp = 1.5"), "in (0, 1]"),                  # efficiency above 1
    (GOOD.replace("[efficiency]", '[runtime]\npreferred = ["tflite"]\n[efficiency]'), "unknown runtime"),
])
def test_malformed_profile_fails_with_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FlexiEdgeError, match=re.escape(message)) as e:
        load_profile(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(FlexiEdgeError) as e:
        load_profile("pixel-99")
    assert "unknown device profile 'pixel-99'" in str(e.value)
    assert all(name in str(e.value) for name in BUILTINS)
