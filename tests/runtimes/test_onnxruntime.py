"""The onnxruntime runtime on a tiny exported FlexiGPT run: generation equals transformers' generate,
sampling is reproducible, scoring equals flexiedge.evaluate, timing reports the three numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexiedge.evaluate import perplexity
from flexiedge.runtimes.onnxruntime import OrtModel
from flexiedge.runtimes.sampling import pick


def _exporter_fixtures():
    """The tiny-export fixtures of tests/exporters/conftest.py (one trace per session, shared)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "exporters" / "conftest.py"
    spec = importlib.util.spec_from_file_location("flexiedge_onnx_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fixtures = _exporter_fixtures()
tiny_flexigpt_run, tiny_checkpoint, tiny_export = (_fixtures.tiny_flexigpt_run, _fixtures.tiny_checkpoint,
                                                   _fixtures.tiny_export)

PROMPT = [5, 17, 42, 99, 7, 63]


@pytest.fixture(scope="module")
def ort_model(tiny_export):
    folder, _ = tiny_export("fp32")
    return OrtModel.load(folder, threads=1)


def test_greedy_generate_equals_transformers_generate(ort_model, tiny_checkpoint):
    with torch.no_grad():
        want = tiny_checkpoint.model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                              min_new_tokens=12, pad_token_id=2)[0, len(PROMPT):].tolist()
    got = ort_model.generate(PROMPT, 12, stop_at_eos=False).token_ids
    assert got == want


def test_generate_streams_every_token_and_stops_at_stop_tokens(ort_model):
    streamed = []
    full = ort_model.generate(PROMPT, 8, stop_at_eos=False, on_token=lambda i, text: streamed.append(i))
    assert streamed == full.token_ids and len(full.token_ids) == 8
    stopped = ort_model.generate(PROMPT, 8, stop_at_eos=False, stop_tokens=[full.token_ids[3]])
    assert stopped.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[3])]


def test_sampling_is_reproducible_with_a_seed(ort_model):
    a = ort_model.generate(PROMPT, 10, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    b = ort_model.generate(PROMPT, 10, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("case, top_k, top_p, allowed", [
    ("top_k=1 is greedy", 1, 1.0, {0}),
    ("top_k=2 keeps the two best", 2, 1.0, {0, 1}),
    ("a tiny top_p keeps only the best", 0, 1e-6, {0}),
    ("top_p=0.7 keeps the smallest prefix with mass >= 0.7", 0, 0.7, {0, 1}),
])
def test_pick_restricts_samples(case, top_k, top_p, allowed):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert {pick(logits, 1.0, top_k, top_p, rng) for _ in range(200)} <= allowed, case


def test_score_equals_pytorch_perplexity(ort_model, tiny_checkpoint):
    ids = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(0))
    want = perplexity(tiny_checkpoint.model, ids, context=64, stride=32, progress=False)
    got = ort_model.score(ids.numpy(), context=64, stride=32)
    assert got.tokens == want.tokens
    assert got.nll == pytest.approx(want.nll, abs=1e-5)


def test_time_reports_ttft_prefill_and_decode_rates(ort_model):
    t = ort_model.time(prompt_tokens=16, gen_tokens=4)
    assert set(t) == {"ttft_s", "prefill_tps", "decode_tps"}
    assert t["ttft_s"] > 0 and t["prefill_tps"] == pytest.approx(16 / t["ttft_s"])


@pytest.mark.parametrize("text", ["plain words and spaces", "héllo wörld ✓ naïve café — ünïcode"])
def test_streamed_pieces_add_up_to_the_decoded_text(tiny_tokenizer, text):
    from flexiedge.runtimes.onnxruntime import _Streamer

    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    streamer = _Streamer(tiny_tokenizer)
    pieces = [streamer.push(i) for i in ids]
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(bool(p) for p in pieces) > 1  # streamed, not all at the end
