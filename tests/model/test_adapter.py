"""Adapter checkpoints: a tuned model stored as its difference from a rebuilt base, loaded back exactly."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import CheckpointError
from taskmllm.model.adapter import ADAPTER_FILE, adapter_error, diff_state, load_adapter, write_adapter
from taskmllm.model.io import CONFIG_FILE, TOKENIZER_DIR
from taskmllm.model.mllm import TaskMLLM
from tests.conftest import tiny_config


@pytest.fixture()
def base_builder(tokenizer):
    def build(seed: int = 0) -> TaskMLLM:
        torch.manual_seed(seed)
        return TaskMLLM(tiny_config(tokenizer), tokenizer).eval()

    return build


def _tune(model: TaskMLLM, rank: int = 4) -> TaskMLLM:
    """What a LoRA + trainable-rows + full-projector stage does to a base: every kind of difference."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() == 2 and "proj" in name:  # a merged LoRA update B @ A: rank `rank`
                p += torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g) * 0.01
        emb = model.llm.get_input_embeddings().weight  # tied to lm_head: new token rows change
        emb[-3:] += torch.randn(3, emb.shape[1], generator=g)
        for p in model.projector.parameters():
            p += torch.randn(p.shape, generator=g)
        for q in model.queries.values():
            q += 1.0
    return model


def test_diff_kinds_and_round_trip(base_builder, tmp_path):
    tuned = _tune(base_builder())
    diff = diff_state(tuned.state_dict(), base_builder().state_dict())
    kinds = {k.split(".", 1)[0] for k in diff}
    assert kinds == {"full", "rows", "lowrank"}
    u = next(v for k, v in diff.items() if k.startswith("lowrank.") and k.endswith(".u"))
    assert u.shape[1] == 4  # the rank of the update, found by SVD
    rows = next(v for k, v in diff.items() if k.startswith("rows.") and k.endswith(".index"))
    assert rows.tolist() == list(range(len(tuned.tokenizer) - 3, len(tuned.tokenizer)))
    assert not any("vision" in k for k in diff)  # unchanged parameters are not stored
    write_adapter(tmp_path, diff, "t", {"seed": 0})
    assert (tmp_path / ADAPTER_FILE).stat().st_size < sum(p.numel() * 4 for p in tuned.parameters()) / 2

    restored = load_adapter(tmp_path, {"t": base_builder})
    assert adapter_error(tuned.state_dict(), restored.state_dict()) < 1e-5
    assert restored.llm.get_output_embeddings().weight is restored.llm.get_input_embeddings().weight
    batch = tuned.processor(["Is there a red circle?"], [None], answers=["Yes"])
    with torch.no_grad():
        torch.testing.assert_close(restored(batch).logits, tuned(batch).logits, atol=1e-5, rtol=1e-5)


def test_load_pretrained_reads_an_adapter_directory(base_builder, tmp_path):
    tuned = _tune(base_builder())
    tuned.config.save(tmp_path / CONFIG_FILE)
    tuned.tokenizer.save_pretrained(str(tmp_path / TOKENIZER_DIR))
    write_adapter(tmp_path, diff_state(tuned.state_dict(), base_builder().state_dict()), "t", {"seed": 0})
    with pytest.raises(CheckpointError, match="adapter checkpoint"):
        TaskMLLM.from_pretrained(tmp_path)  # the base cannot be rebuilt without its builder
    with pytest.raises(CheckpointError, match="base 't' is not one of"):
        TaskMLLM.from_pretrained(tmp_path, bases={"other": base_builder})
    loaded = TaskMLLM.from_pretrained(tmp_path, bases={"t": base_builder})
    assert adapter_error(tuned.state_dict(), loaded.state_dict()) < 1e-5
    with pytest.raises(CheckpointError, match="does not fit"):  # a base of another shape
        load_adapter(tmp_path, {"t": lambda seed: TaskMLLM(tiny_config(tuned.tokenizer, hidden=32), tuned.tokenizer)})


def test_half_precision_factors_halve_the_low_rank_part(base_builder, tmp_path):
    tuned = _tune(base_builder())
    base = base_builder().state_dict()
    full, half = diff_state(tuned.state_dict(), base), diff_state(tuned.state_dict(), base, factor_dtype=torch.float16)
    low = [k for k in full if k.startswith("lowrank.")]
    assert all(half[k].dtype == torch.float16 for k in low)
    assert sum(half[k].numel() * 2 for k in low) * 2 == sum(full[k].numel() * 4 for k in low)
    write_adapter(tmp_path, half, "t", {"seed": 0})
    restored = load_adapter(tmp_path, {"t": base_builder})
    assert all(v.dtype == torch.float32 for v in restored.state_dict().values() if v.is_floating_point())
    assert adapter_error(tuned.state_dict(), restored.state_dict()) < 1e-4  # float16 of a ~0.1 difference
