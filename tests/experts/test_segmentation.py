"""Segmentation expert: batched decoding equals SAM's MaskDecoder, loss terms, postprocess, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import ConfigError, InputError, TargetError
from taskmllm.experts import SegmentationOutput, TaskTarget, VisionFeatures, build_expert, default_spec
from taskmllm.experts.segmentation import batched_predict_masks, dice_loss

H, C, GRID, SIZE = 32, 24, (6, 6), 96


@pytest.fixture()
def expert():
    torch.manual_seed(0)
    return build_expert("seg", default_spec("seg", H, C, GRID, SIZE, dim=32)).eval()


def _features(m: int, t: int = 1, c: int = C) -> VisionFeatures:
    return VisionFeatures(torch.randn(m, t, GRID[0] * GRID[1], c), GRID, SIZE)


def test_output_shapes_and_batched_decoder_equals_per_call_mask_decoder(expert):
    torch.manual_seed(1)
    expert.num_queries = 2  # K = 2 sparse prompts per call
    q = torch.randn(3, 2, H)
    feats = _features(3)
    out = expert(q, feats)
    assert out.mask_logits.shape == (3, 4 * GRID[0], 4 * GRID[1]) and out.iou_scores.shape == (3,)
    assert ((out.iou_scores >= 0) & (out.iou_scores <= 1)).all()

    d = 32
    image = expert.feature_proj(feats.features[:, 0]).transpose(1, 2).reshape(3, d, *GRID)
    pe = expert.pe.grid(GRID).transpose(0, 1).reshape(1, d, *GRID)
    sparse = expert.query_proj(q)
    dense = expert.no_mask_embed.weight.reshape(1, d, 1, 1).expand(1, d, *GRID)
    batched, batched_iou = batched_predict_masks(expert.mask_decoder, image, pe, sparse, dense)
    for i in range(3):  # the reference: segment_anything's own forward, one image at a time
        mask, iou = expert.mask_decoder(image[i : i + 1], pe, sparse[i : i + 1], dense, multimask_output=False)
        torch.testing.assert_close(batched[i], mask[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched_iou[i], iou[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.mask_logits, batched[:, 0])


def test_calls_are_independent(expert):
    torch.manual_seed(2)
    q, feats = torch.randn(2, 1, H), _features(2)
    both = expert(q, feats)
    alone = expert(q[1:], VisionFeatures(feats.features[1:], GRID, SIZE))
    torch.testing.assert_close(both.mask_logits[1], alone.mask_logits[0], atol=1e-5, rtol=1e-4)


def test_dice_by_hand():
    logits = torch.tensor([[[0.0, 0.0]]])  # p = 0.5, 0.5
    target = torch.tensor([[[1.0, 0.0]]])
    # 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 2 / 3)
    big = torch.tensor([[[50.0, -50.0]]])
    assert dice_loss(big, target).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_weights_and_perfect_prediction(expert):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = True
    logits = torch.full((1, 24, 24), -30.0)
    logits[:, :, :12] = 30.0
    perfect = SegmentationOutput(mask_logits=logits, iou_scores=torch.ones(1))
    losses = expert.loss(perfect, [TaskTarget("seg", mask=mask)])
    assert losses["seg_bce"].item() < 0.01 and losses["seg_dice"].item() < 0.01 and losses["seg_iou"].item() < 1e-6

    flat = SegmentationOutput(mask_logits=torch.zeros(1, 24, 24), iou_scores=torch.zeros(1))
    losses = expert.loss(flat, [TaskTarget("seg", mask=mask)])
    assert losses["seg_bce"].item() == pytest.approx(2.0 * np.log(2), rel=1e-5)  # 2 * BCE(p=0.5)
    assert losses["seg_dice"].item() == pytest.approx(0.5 * (1 - (2 * 0.5 * 4608 + 1) / (4608 + 4608 + 1)), rel=1e-5)
    # threshold at 0 predicts nothing: IoU reached 0, predicted 0
    assert losses["seg_iou"].item() == pytest.approx(0.0)


def test_loss_accepts_targets_at_another_resolution(expert):
    small = np.zeros((48, 48), bool)
    small[:, :24] = True
    logits = torch.full((1, 24, 24), -30.0)
    logits[:, :, :12] = 30.0
    losses = expert.loss(SegmentationOutput(logits, torch.ones(1)), [TaskTarget("seg", mask=torch.from_numpy(small))])
    assert losses["seg_bce"].item() < 0.01


def test_postprocess_to_original_non_square_size(expert):
    logits = torch.full((2, 24, 24), -5.0)
    logits[0, :, :12] = 5.0  # left half
    out = SegmentationOutput(mask_logits=logits, iou_scores=torch.tensor([0.9, 0.1]))
    res = expert.postprocess(out, [(50, 70), (20, 30)])
    assert res[0].mask.shape == (50, 70) and res[0].mask.dtype == np.bool_
    assert res[0].mask[:, :35].all() and not res[0].mask[:, 35:].any()
    assert not res[1].mask.any() and res[1].mask.shape == (20, 30)
    assert res[0].score == pytest.approx(0.9)
    with pytest.raises(InputError, match="2 outputs but 1 sizes"):
        expert.postprocess(out, [(50, 70)])


def test_bad_targets_are_target_errors(expert):
    out = expert(torch.randn(1, 1, H), _features(1))
    with pytest.raises(TargetError, match="target 0 is for task 'det', not 'seg'"):
        expert.loss(out, [TaskTarget("det", boxes=np.zeros((0, 4)))])
    with pytest.raises(TargetError, match="has no mask"):
        expert.loss(out, [TaskTarget("seg")])
    with pytest.raises(TargetError, match=r"\(H, W\)"):
        expert.loss(out, [TaskTarget("seg", mask=np.ones((2, 8, 8), bool))])
    with pytest.raises(TargetError, match="1 outputs but 2 targets"):
        expert.loss(out, [TaskTarget("seg", mask=np.ones((8, 8), bool))] * 2)


def test_bad_inputs_are_config_errors(expert):
    with pytest.raises(ConfigError, match="T=1"):
        expert(torch.randn(1, 1, H), _features(1, t=2))
    with pytest.raises(ConfigError, match="width C=7"):
        expert(torch.randn(1, 1, H), _features(1, c=7))
    with pytest.raises(ConfigError, match="expected 1 query states"):
        expert(torch.randn(1, 3, H), _features(1))
    with pytest.raises(ConfigError, match="hidden size 5"):
        expert(torch.randn(1, 1, 5), _features(1))
    with pytest.raises(ConfigError, match="grid 5x5"):
        expert(torch.randn(1, 1, H), VisionFeatures(torch.randn(1, 1, 36, C), (5, 5), SIZE))
    with pytest.raises(ConfigError, match="2 query calls but vision features for 1"):
        expert(torch.randn(2, 1, H), _features(1))


def test_other_grids_work(expert):
    out = expert(torch.randn(1, 1, H), VisionFeatures(torch.randn(1, 1, 64, C), (8, 8), 128))
    assert out.mask_logits.shape == (1, 32, 32)


def _detail_expert(seed: int = 0):
    torch.manual_seed(seed)
    return build_expert("seg", default_spec("seg", H, C, GRID, SIZE, dim=32, detail=True)).eval()


def _decoded_by_hand(expert, q, feats, d):
    """SAM's two-way transformer run step by step on the expert's projected inputs: ``(hs, src, sparse)``."""
    dec, m = expert.mask_decoder, q.shape[0]
    image = expert.feature_proj(feats.features[:, 0]).transpose(1, 2).reshape(m, d, *GRID)
    pe = expert.pe.grid(GRID).transpose(0, 1).reshape(1, d, *GRID)
    sparse = expert.query_proj(q)
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])[None].expand(m, -1, -1)
    hs, src = dec.transformer(image + expert.no_mask_embed.weight.reshape(1, d, 1, 1), pe.expand(m, -1, -1, -1),
                              torch.cat([tokens, sparse], 1))
    return hs, src, sparse


def test_detail_adds_the_pixel_stem_to_the_upscaled_embedding_before_the_mask_product():
    """Reference by hand: SAM's decoder run step by step, ``DetailStem(pixels)`` added to ``output_upscaling``'s
    output, then the hypernetwork product; and a fresh stem (last layer zero) changes nothing."""
    expert = _detail_expert()
    plain = build_expert("seg", default_spec("seg", H, C, GRID, SIZE, dim=32))
    plain.load_state_dict({k: v for k, v in expert.state_dict().items() if not k.startswith("detail.")})
    plain.eval()
    torch.manual_seed(3)
    q, feats = torch.randn(2, 1, H), _features(2)
    pixels = torch.randn(2, 1, 3, SIZE, SIZE)
    with_pixels = VisionFeatures(feats.features, GRID, SIZE, pixels=pixels)
    torch.testing.assert_close(expert(q, with_pixels).mask_logits, plain(q, feats).mask_logits)

    torch.nn.init.normal_(expert.detail.net[-1].weight)
    got = expert(q, with_pixels).mask_logits
    d, dec = 32, expert.mask_decoder
    hs, src, _ = _decoded_by_hand(expert, q, feats, d)
    up = dec.output_upscaling(src.transpose(1, 2).reshape(2, d, *GRID))
    up = up + expert.detail.net(pixels[:, 0])  # stride 4: 96 px -> 24 x 24 = 4 x the 6 x 6 grid
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1])
    want = torch.einsum("bc,bchw->bhw", hyper, up)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_query_match_adds_the_decoded_patches_match_with_the_query_to_the_masks():
    """Reference by hand: SAM's decoder step by step, then ``<src patch, W mean(q)> / sqrt(D) + b`` on the patch
    grid, upsampled bilinearly to the mask size and added; a fresh match (zero) changes nothing."""
    torch.manual_seed(0)
    expert = build_expert("seg", default_spec("seg", H, C, GRID, SIZE, dim=32, query_match=True)).eval()
    plain = build_expert("seg", default_spec("seg", H, C, GRID, SIZE, dim=32))
    plain.load_state_dict({k: v for k, v in expert.state_dict().items() if not k.startswith("match.")})
    plain.eval()
    torch.manual_seed(4)
    expert.num_queries = plain.num_queries = 2
    q, feats = torch.randn(2, 2, H), _features(2)
    torch.testing.assert_close(expert(q, feats).mask_logits, plain(q, feats).mask_logits)

    torch.nn.init.normal_(expert.match.proj.weight)
    torch.nn.init.constant_(expert.match.bias, 0.3)
    got = expert(q, feats).mask_logits
    d = 32
    _, src, sparse = _decoded_by_hand(expert, q, feats, d)
    key = sparse.mean(1) @ expert.match.proj.weight.T + expert.match.proj.bias  # (2, D)
    patch = torch.einsum("bnd,bd->bn", src, key) / d ** 0.5 + 0.3
    up = torch.nn.functional.interpolate(patch.reshape(2, 1, *GRID), size=(4 * GRID[0], 4 * GRID[1]),
                                         mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, plain(q, feats).mask_logits + up, atol=1e-5, rtol=1e-4)


def test_detail_gets_gradient_and_needs_pixels():
    expert = _detail_expert().train()
    torch.nn.init.normal_(expert.detail.net[-1].weight, std=0.1)
    pixels = torch.randn(1, 1, 3, SIZE, SIZE, requires_grad=True)
    out = expert(torch.randn(1, 1, H), VisionFeatures(torch.randn(1, 1, 36, C), GRID, SIZE, pixels=pixels))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10:40, 20:50] = True
    sum(expert.loss(out, [TaskTarget("seg", mask=mask)]).values()).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is not None for p in expert.detail.parameters())
    with pytest.raises(InputError, match="pixels"):
        expert(torch.randn(1, 1, H), _features(1))


def test_positional_encoding_is_sams_in_fp32_also_on_a_bf16_model():
    """The grid and point encodings equal segment_anything's ``PositionEmbeddingRandom`` bit for bit in fp32, and a
    bf16-cast module still encodes in fp32 (SAM's own ``forward`` fails there: an fp32 grid against a bf16 matrix)."""
    from taskmllm.experts.common import GridPositionalEncoding

    torch.manual_seed(0)
    pe = GridPositionalEncoding(32)
    for size in [(6, 6), (3, 5)]:
        want = pe.pe(size).flatten(1).transpose(0, 1)  # SAM: (D, h, w) -> (h*w, D)
        assert torch.equal(pe.grid(size), want)
    points = torch.rand(4, 2)
    assert torch.equal(pe.points(points), pe.pe._pe_encoding(points.clone()))

    half = GridPositionalEncoding(32).to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        half.pe((6, 6))
    rounded = half.pe.positional_encoding_gaussian_matrix.float()
    reference = GridPositionalEncoding(32)
    reference.pe.positional_encoding_gaussian_matrix.copy_(rounded)
    assert half.grid((6, 6)).dtype == torch.float32
    assert torch.equal(half.grid((6, 6)), reference.grid((6, 6)))
