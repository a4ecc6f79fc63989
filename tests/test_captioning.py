"""Tier 1: captioning's two-stream mask, loss, KV-cached generation, beam search; BLEU-4."""

import math

import pytest
import torch

from condmoe.models import MoAArgs, MoEArgs, create_model, moe_layer_indices, pop_moe_stats
from condmoe.models.captioning import caption_attention_mask, generate
from condmoe.train.metrics import corpus_bleu

VOCAB, SPE, EOS = 40, 4, 2


def test_two_stream_mask_on_a_hand_made_example():
    # 2 visual tokens, text [T0 T1 T2 pad], predictions [P0 P1 P2] (P_j predicts T_{j+1})
    mask = torch.tensor([[True, True, True, False]])
    allowed = caption_attention_mask(2, mask)[0].int()
    v, t, p = [0, 1], [2, 3, 4, 5], [6, 7, 8]
    expected = torch.zeros(9, 9, dtype=torch.int)
    for i in v:
        expected[i, v] = 1  # visual tokens see only visual tokens
    for a in range(4):
        expected[t[a], v] = 1
        for b in range(a + 1):
            expected[t[a], t[b]] = int(b < 3)  # causal, never the padding
    for j in range(3):
        expected[p[j], v] = 1
        for b in range(j + 1):
            expected[p[j], t[b]] = 1  # P_j sees T_0..T_j
        expected[p[j], p[j]] = 1  # and itself, no other prediction token
    assert torch.equal(allowed, expected)


def model(moa: bool = False):
    torch.manual_seed(0)
    m = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=12, moe_layers=moe_layer_indices(4),
                     moe=MoEArgs(num_experts=4, top_k=2, drop_tokens=False),
                     moa_layers=(1,) if moa else (), moa=MoAArgs(num_experts=4, num_heads=2, routing="token",
                                                                        mi_loss_weight=0.0))
    return m.eval()


def vocab_features(m):
    ids = torch.stack([torch.full((VOCAB,), SPE), torch.arange(VOCAB), torch.full((VOCAB,), EOS)], 1)
    with torch.no_grad():
        return m.encode_texts(ids, torch.ones(VOCAB, 3, dtype=torch.bool), attribute="vocab_target"), ids


def test_caption_loss_predicts_the_next_token_and_trains_every_parameter():
    m = model().train()
    ids = torch.tensor([[SPE, 10, 11, 12, EOS], [SPE, 20, 21, EOS, 0]])
    mask = ids.ne(0)
    vocab_ids = torch.stack([torch.full((VOCAB,), SPE), torch.arange(VOCAB), torch.full((VOCAB,), EOS)], 1)
    out = m("captioning", {"images": torch.randn(2, 3, 32, 32), "text_ids": ids, "text_mask": mask,
                           "target_ids": vocab_ids, "target_mask": torch.ones(VOCAB, 3, dtype=torch.bool)})
    assert out.logits.shape == (4 + 3, VOCAB)  # one prediction per real next token
    (out.loss + pop_moe_stats(m).aux_loss).backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]


@pytest.mark.parametrize("moa", [False, True])
def test_cached_generation_equals_recomputation(moa):
    m = model(moa)
    vocab, _ = vocab_features(m)
    images = torch.randn(3, 3, 32, 32)
    cached = generate(m, images, vocab, SPE, EOS, max_length=6, beam_size=2, cache=True)
    recomputed = generate(m, images, vocab, SPE, EOS, max_length=6, beam_size=2, cache=False)
    for (a, sa), (b, sb) in zip(cached, recomputed):
        assert a == b and sa == pytest.approx(sb, abs=1e-4)


def test_greedy_matches_a_hand_rolled_argmax_loop_and_beam_search_scores_higher():
    m = model()
    vocab, _ = vocab_features(m)
    images = torch.randn(2, 3, 32, 32)
    greedy = generate(m, images, vocab, SPE, EOS, max_length=5, beam_size=1, cache=False)
    beam = generate(m, images, vocab, SPE, EOS, max_length=5, beam_size=4, cache=True)
    from condmoe.models.captioning import _Decoder

    for b in range(2):
        decoder = _Decoder(m, images[b:b + 1], 0, cache=False)
        tokens, logp_sum = torch.tensor([[SPE]]), 0.0
        scale = m.caption_scale().clamp(max=math.log(100.0)).exp()
        with torch.no_grad():
            for _ in range(5):
                feats = torch.nn.functional.normalize(decoder.step(tokens), dim=-1)
                logp = torch.log_softmax(scale * feats @ torch.nn.functional.normalize(vocab, dim=-1).t(), -1)[0]
                token = int(logp.argmax())
                logp_sum += float(logp[token])
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
                if token == EOS:
                    break
        assert greedy[b][0] == tokens[0, 1:].tolist()
        assert greedy[b][1] == pytest.approx(logp_sum, abs=1e-4)
        assert beam[b][1] >= greedy[b][1] - 1e-5  # the beam keeps the greedy path among its candidates


def test_corpus_bleu_hand_computed():
    # pycocoevalcap's BLEU: precision (matches + 1e-15) / (total + 1e-9), so a zero count is smoothed, not 0
    tiny, small = 1e-15, 1e-9
    hyp = ["the cat sat on the mat".split()]
    assert corpus_bleu(hyp, [[hyp[0]]]) == pytest.approx(1.0)
    ref = [["the cat is on the mat".split()]]
    # precisions 5/6, 3/5, 1/4, 0/3: the 4-gram precision is 1e-15 / 3, BLEU-4 tiny but positive
    p = [(5 + tiny) / (6 + small), (3 + tiny) / (5 + small), (1 + tiny) / (4 + small), tiny / (3 + small)]
    assert corpus_bleu(hyp, ref) == pytest.approx(math.prod(p) ** 0.25, rel=1e-12)
    assert 0.0 < corpus_bleu(hyp, ref) < 1e-3
    hyp2 = ["a red circle in the top left".split()]
    ref2 = [["a red circle in the top right corner".split()]]
    p = [6 / 7, 5 / 6, 4 / 5, 3 / 4]
    expected = math.exp(1 - 8 / 7) * math.exp(sum(math.log(x) for x in p) / 4)
    assert corpus_bleu(hyp2, ref2) == pytest.approx(expected)
