"""Bad input gets one clear line on stderr, exit status 2, and no partial output."""

import json

import pytest

from flexiedge.cli import main


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args,message", [
    (["prune", "{missing}", "--ratio", "0.3"], "not found"),
    (["prune", "{gpt2}", "--ratio", "0.3"], "is not supported; flexiedge supports LlamaForCausalLM"),
    (["prune", "{tiny}", "--ratio", "0"], "--ratio must be between 0 and 1"),
    (["prune", "{tiny}", "--ratio", "1"], "--ratio must be between 0 and 1"),
    (["prune", "{tiny}", "--ratio", "-0.2"], "--ratio must be between 0 and 1"),
    (["prune", "{tiny}", "--blocks", "7"], "cannot prune 7 of 6 blocks"),
    (["prune", "{tiny}", "--blocks", "5"], "the first and last blocks are protected"),
    (["prune", "{tiny}", "--rank", "100"], "--rank 100 is larger than the smallest projection allows (32)"),
    (["eval", "{missing}"], "not found"),
    (["info", "{tiny}"], "has no flexiedge.json"),
])
def test_bad_input_is_answered_with_one_clear_line(args, message, tmp_path, tiny_model_dir, gpt2_dir, capsys,
                                                    tiny_text_file):
    places = dict(missing=str(tmp_path / "nope"), gpt2=str(gpt2_dir), tiny=str(tiny_model_dir()))
    out = tmp_path / "out"
    argv = [a.format(**places) for a in args]
    capsys.readouterr()  # drop what building the fixtures printed
    if argv[0] == "prune":
        argv += ["--out", str(out), "--calib", str(tiny_text_file), "--calib-tokens", "128", "--seq-len", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flexiedge: error:")
    assert message in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_corrupt_checkpoint_is_refused_by_eval(tiny_run, capsys):
    run = tiny_run()
    capsys.readouterr()
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(run)]) == 2
    assert "corrupt or was modified" in capsys.readouterr().err


def test_info_reports_the_slot_map_and_savings(tiny_run, capsys):
    run = tiny_run()
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["pruned"]) == 2 and info["prune_ratio"] == pytest.approx(2 / 6)
    assert sorted(int(slot) for slot in info["slot_map"]) == info["pruned"]
    assert info["parameters"]["stored"] < info["parameters"]["source"] < info["parameters"]["computed"]


def test_a_download_works_when_stderr_has_no_file_descriptor(tmp_path, monkeypatch, capsys):
    """pytest's capture, notebooks: the first download of a built-in text must not need a real stderr."""
    import io
    import sys

    from flexiedge.cache import run_to_stderr

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert run_to_stderr([sys.executable, "-c", "print('downloaded')"]) == 0
    assert "downloaded" in sys.stderr.getvalue()
