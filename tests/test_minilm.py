"""Our own MiniLM (BERT) forward pass and tokenizer must equal transformers'
on the real weights: the default model's text side no longer imports it."""

import subprocess
import sys

import pytest
import torch

from retrieval.encoders.minilm import MiniLMTokenizer, load_text_tower, package_dir

ODD_TEXTS = [
    "A dog runs on the beach.",
    "",
    "Ünïcödé café naïve — “quotes” 日本語 テスト 😀",
    "word " * 100,  # longer than the 32-token limit: truncated
    "   leading and trailing   ",
    "CAPS and numbers 12345 e.g. U.S.A.",
    "tab\tnew\nline\r\n",
    "\u200b\u00ad zero width and soft hyphen",
    "<script>alert(1)</script> %s {0} \\x00",
]


@pytest.fixture(scope="module")
def hf_side():
    transformers = pytest.importorskip("transformers")
    folder = str(package_dir())
    return (transformers.AutoTokenizer.from_pretrained(folder),
            transformers.AutoModel.from_pretrained(folder).eval())


@pytest.mark.parametrize("pad_to_max", [False, True])
def test_tokenizer_equals_transformers(hf_side, pad_to_max):
    hf_tok, _ = hf_side
    ids, mask = MiniLMTokenizer()(ODD_TEXTS, 32, pad_to_max=pad_to_max)
    ref = hf_tok(ODD_TEXTS, padding="max_length" if pad_to_max else True, truncation=True, max_length=32,
                 return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"])
    assert ids.shape[1] == 32  # the long text reaches the limit either way


def test_text_tower_equals_transformers(hf_side):
    _, hf_model = hf_side
    ours = load_text_tower().eval()
    ids, mask = MiniLMTokenizer()(ODD_TEXTS, 32)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() < 1e-4
    # and it is the pretrained model, not a random one that happens to agree with itself
    assert ref[real].abs().mean().item() > 0.1


def test_checkpoint_keys_match_transformers_names(hf_side):
    """Checkpoints written with transformers' BertModel load into ours and back."""
    _, hf_model = hf_side
    ours = set(load_text_tower(pretrained=False).state_dict())
    theirs = set(hf_model.state_dict())
    assert ours <= theirs
    assert {k.split(".")[0] for k in theirs - ours} <= {"pooler", "embeddings"}
    assert all(k.startswith("pooler.") or k.endswith("position_ids") for k in theirs - ours)


def test_text_tower_trains():
    tower = load_text_tower(pretrained=False).train()
    ids, mask = MiniLMTokenizer()(["a red square", "a blue circle on grass"], 32)
    out = tower(ids, mask)
    out[mask.bool()].pow(2).mean().backward()
    grads = [p.grad for p in tower.encoder.layer[-1].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_default_model_searches_without_slow_imports(tmp_path):
    """One-shot `xmr search` used to spend ~2 s importing transformers' BERT,
    and about a second more in sympy / torch._dynamo pulled in by a meta-device
    embedding and by nn.MultiheadAttention's mask check."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from reranker.base import ImageCandidate\n"
        "from reranker.xmr import XmrReranker\n"
        "from retrieval.encoders import create_encoder\n"
        "enc = create_encoder('xmr-lite2', device='cpu')\n"
        "v = enc.encode_texts(['a dog runs on the beach'])\n"
        "assert v.shape == (1, enc.dim)\n"
        "rr = XmrReranker(enc.reranker_model, enc.text_states, 1.0)\n"
        "n, w = enc.token_shape\n"
        "c = [ImageCandidate(i, v[0], np.zeros((n, w), np.float16)) for i in range(3)]\n"
        "assert rr.score_text_images('a dog runs on the beach', v[0], c).shape == (3,)\n"
        "slow = ('transformers', 'sympy', 'torch._dynamo.symbolic_convert')\n"
        "print(sorted(m for m in sys.modules if m in slow or m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
