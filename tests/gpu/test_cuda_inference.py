"""The GPU suite's inference half (``make test-gpu``): the interventions and the compiled decoder on ``cuda``.

- identity settings of every intervention (VHR alpha 1, VAR p 0, ZeroTuning gamma 1) give bit-identical logits and
  tokens on the GPU too, SDPA (whose CUDA kernels change with the mask) and eager, fp32 and bf16, a padded batch;
- each intervention at real settings gives on the GPU the logits it gives on the CPU (fp32, TF32 off), and changes
  them (the check is not vacuous); in bf16 it runs and stays finite;
- ``compile=True`` on the GPU (a ``StaticCache`` and the one-token step captured in CUDA graphs, ``mode=
  "reduce-overhead"``) gives the default decoder's tokens, and a second call reuses the captured step;
- ``Pipeline`` with the shipped ``tiny``'s calibrated VHR answers on the GPU as on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from tests.model.intervention_models import PROMPTS, images, plant_image_sinks, plant_sink, varied_model
from tests.model.test_identity import IDENTITIES, SINK_DIM
from tests.recorded.prompts import assert_like, record, requests

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU suite needs one")]

#: real (non-identity) settings; VAR's official mode needs a visual sink: planted on image tokens 2 and 5
ACTIVE = {
    "VHR": lambda: VHR(alpha=1.5, layers=[1, 2, 3]),
    "VAR-official": lambda: VAR(p=0.6, sink_dims=[SINK_DIM]),
    "VAR-paper": lambda: VAR(p=0.6, tau=4.0, sink_dims=[SINK_DIM], mode="paper"),
    "ZeroTuning-per-head": lambda: ZeroTuning(gammas={(0, 1): 1.5, (2, 0): 0.5, (3, 2): 2.0}),
}


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: TF32 matrix products and convolutions off for the comparisons with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def planted(tokenizer, attn: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The identity tests' random model (BOS sink in ``SINK_DIM``) plus image-token sinks, on ``device``."""
    m = varied_model(tokenizer, attn=attn)
    plant_sink(m, tokenizer.bos_token_id, SINK_DIM, value=1000.0)
    plant_image_sinks(m, SINK_DIM, [2, 5])
    return m.to(device=device, dtype=dtype)


def logits(model, batch, intervention=None) -> torch.Tensor:
    with torch.no_grad():
        if intervention is None:
            return model(batch).logits
        with intervention.attach(model, batch):
            return model(batch).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(IDENTITIES))
def test_identity_settings_are_bit_identical_on_cuda(tokenizer, name, attn, dtype):
    m = planted(tokenizer, attn, "cuda", dtype)
    batch = m.processor(PROMPTS, images()).to("cuda", dtype=dtype)
    assert (batch.attention_mask == 0).any(), "the batch must be padded"
    want = logits(m, batch)
    assert torch.equal(logits(m, batch, IDENTITIES[name]()), want)
    base = m.generate(batch, max_new_tokens=6)
    out = m.generate(batch, max_new_tokens=6, intervention=IDENTITIES[name]())
    assert out.sequences == base.sequences


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_interventions_on_cuda_give_the_cpu_logits(tokenizer, name, attn):
    cpu = planted(tokenizer, attn)
    batch = cpu.processor(PROMPTS, images())
    want, plain = logits(cpu, batch, ACTIVE[name]()), logits(cpu, batch)
    real = batch.attention_mask.bool()
    assert (want - plain)[real].abs().max() > 1e-3, f"{name} should change the logits of this model"
    gpu = planted(tokenizer, attn, "cuda")
    got = logits(gpu, batch.to("cuda"), ACTIVE[name]())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu()[real], want[real], atol=2e-3, rtol=1e-3)
    bf16 = planted(tokenizer, attn, "cuda", torch.bfloat16)
    assert torch.isfinite(logits(bf16, batch.to("cuda", dtype=torch.bfloat16), ACTIVE[name]())[real]).all()


def test_compiled_decode_on_cuda_gives_the_same_tokens(tokenizer, rgb_image):
    """CUDA graphs (``reduce-overhead``) through ``compile=True``: the default decoder's tokens, twice, one step."""
    m = varied_model(tokenizer, layers=2).to("cuda")
    batch = m.processor(PROMPTS, [rgb_image, None, [rgb_image, rgb_image[::-1].copy()]]).to("cuda")
    want = m.generate(batch, max_new_tokens=16).sequences
    assert any(len(set(s)) > 2 for s in want)
    assert m.generate(batch, max_new_tokens=16, compile=True).sequences == want
    steps = dict(m.decode_steps._steps)
    assert m.generate(batch, max_new_tokens=16, compile=True).sequences == want
    assert m.decode_steps._steps == steps and len(steps) == 1


def test_pipeline_with_calibrated_vhr_answers_on_cuda_as_on_the_cpu():
    """The shipped ``tiny`` with its calibrated VHR (``intervention="vhr"``), every request of ``tests/recorded``
    alone: the same text on the GPU as on the CPU for at least 12 of 13, masks and boxes alike."""
    from taskmllm.router.pipeline import Pipeline

    reqs = requests()
    got, want = ([record(pipe(v, p, max_new_tokens=48, intervention="vhr")) for v, p in reqs]
                 for pipe in (Pipeline.from_pretrained("tiny", device="cuda"), Pipeline.from_pretrained("tiny")))
    assert_like(got, want, min_same=12)


def test_int8_quantized_pipeline_on_cuda_gives_the_cpu_logits():
    """``quantize="int8"`` on the GPU (dequantize + ``F.linear``) computes the CPU kernel's product; int4 is refused
    there with its reason."""
    from taskmllm.errors import ConfigError
    from taskmllm.router.pipeline import Pipeline

    cpu = Pipeline.from_pretrained("tiny", quantize="int8")
    gpu = Pipeline.from_pretrained("tiny", device="cuda", quantize="int8")
    batch = cpu.processor(["What is a circle?"], [None])
    with torch.no_grad():
        want = cpu.model.mllm(batch).logits
        got = gpu.model.mllm(batch.to("cuda")).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="CPU kernel only"):
        Pipeline.from_pretrained("tiny", device="cuda", quantize="int4")
