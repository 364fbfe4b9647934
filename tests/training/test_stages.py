"""Every stage YAML: apply_stage trains exactly the named components, and two steps run on a tiny model."""

from __future__ import annotations

import copy

import json

import numpy as np

import pytest
import torch
import yaml

from taskmllm.errors import ConfigError
from taskmllm.model.tokens import PROTOCOL_TOKENS
from taskmllm.training.config import load_config
from taskmllm.training.stages import apply_stage, merge_lora, protocol_token_ids
from taskmllm.training.aux import build_aux
from taskmllm.training.train import aux_context, build_joint, param_groups, train
from tests.training.helpers import RECIPE, STAGES, overrides


@pytest.mark.parametrize("stage", STAGES)
def test_apply_stage_trains_exactly_the_named_components(stage, tmp_path):
    cfg = load_config(RECIPE / f"{stage}.yaml", overrides(tmp_path))
    joint = build_joint(cfg)
    aux = _aux(joint, cfg)
    assert list(aux) == list(cfg.stage.aux)
    report = {r.name: r for r in apply_stage(joint, cfg.stage, aux, protocol_token_ids(joint.mllm.tokenizer))}
    named = cfg.stage.trainable
    for name, r in report.items():
        default = "full" if name.startswith("aux.") else "frozen"  # an auxiliary loss's head exists to train
        want = named.get(name, named.get(name.split(".")[0], default) if "." in name else default)
        assert r.mode == want, name
        assert (r.trainable > 0) == (want != "frozen"), f"{stage}: {name} ({want}) has {r.trainable} trainable"
        if want == "lora":
            assert r.trainable < r.total
        if want == "full":
            assert r.trainable == r.total
    # requires_grad is set on nothing outside the components
    total = sum(r.trainable for r in report.values())
    assert total == sum(p.numel() for p in list(joint.parameters()) + list(aux.parameters()) if p.requires_grad)
    if named.get("llm") == "lora":  # protocol-token rows train through peft's trainable tokens
        assert any("token_adapter" in n and p.requires_grad for n, p in joint.named_parameters())
        merge_lora(joint, aux)
        assert type(joint.mllm.llm).__name__ == "LlamaForCausalLM"
        assert not any(p.requires_grad is False and "lora" in n for n, p in joint.named_parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_two_training_steps(stage, tmp_path):
    cfg = load_config(RECIPE / f"{stage}.yaml", overrides(tmp_path, "--max_steps=2", "--save_every=2"))
    final = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_weighted"])) for r in rows)
    for name in cfg.stage.aux:  # the training loop knows them only as stage data
        assert rows[0][name] > 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    for f in ("model.safetensors", "optimizer.safetensors", "state.json", "train_config.yaml"):
        assert (ckpt / f).is_file()
    saved = yaml.safe_load((ckpt / "train_config.yaml").read_text())
    assert saved["stage"]["name"] == stage and saved["model"]["llm"]["hidden_size"] == 64
    from taskmllm.router.joint import JointModel

    assert isinstance(JointModel.from_pretrained(final), JointModel)
    # final/ holds its config and checksums: written in the same atomic rename as its weights
    assert load_config(final / "train_config.yaml").stage.name == stage
    assert "model.safetensors" in json.loads((final / "checksums.json").read_text())["files"]


def test_protocol_token_rows_get_their_own_learning_rate(tmp_path):
    cfg = load_config(RECIPE / "joint.yaml", overrides(tmp_path, "--optim.token_lr=0.01", "--stage.trainable.llm=lora"))
    joint = build_joint(cfg)
    tok = joint.mllm.tokenizer
    ids = protocol_token_ids(tok, joint.mllm.config.tokens.tasks)
    # taskmllm's own tokens, not the LLM's BOS/EOS/PAD
    tasks = [f"<{t}>" for t in joint.mllm.config.tokens.tasks]
    assert sorted(tok.convert_ids_to_tokens(ids)) == sorted(PROTOCOL_TOKENS + tuple(tasks))
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    apply_stage(joint, cfg.stage, _aux(joint, cfg), ids)
    groups = param_groups(joint, cfg.optim)
    token_group = [g for g in groups if g.get("lr") == 0.01]
    assert len(token_group) == 1 and token_group[0]["weight_decay"] == 0.0
    rows = [p for n, p in joint.named_parameters() if "trainable_tokens_delta" in n]
    assert {id(p) for p in token_group[0]["params"]} == {id(p) for p in rows}
    assert sum(p.shape[0] for p in rows) == len(ids)
    # every other trainable parameter is in exactly one of the remaining groups, at the base rate
    rest = [p for g in groups if g.get("lr") != 0.01 for p in g["params"]]
    assert all(g.get("lr", cfg.optim.lr) == cfg.optim.lr for g in groups if g is not token_group[0])
    assert len(rest) + len(rows) == sum(1 for p in joint.parameters() if p.requires_grad)


def test_recipe_sets_expert_options_of_a_fresh_model(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\n"
                     "model: {experts: {det: {box_head: localizing}, track: {box_head: localizing, heat_weight: 2.0}}}\n")
    joint = build_joint(load_config(stage, overrides(tmp_path)))
    assert joint.experts["det"].options.box_head == "localizing"
    assert joint.experts["track"].options.box_head == "localizing" and joint.experts["track"].options.heat_weight == 2.0
    assert joint.experts["seg"].spec.options == {"bce_weight": 0.5, "dice_weight": 2.0}  # pretrain.yaml's
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\nmodel: {{experts: {{det: {{box_head: conv}}}}}}\n")
    with pytest.raises(ConfigError, match="box_head must be one of"):
        build_joint(load_config(bad, overrides(tmp_path)))
    bad.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\nmodel: {{experts: {{track: {{box_head: conv}}}}}}\n")
    with pytest.raises(ConfigError, match="TrackingOptions.box_head must be one of"):
        build_joint(load_config(bad, overrides(tmp_path)))
    # a checkpoint's experts keep their weights; options that keep the parameters (loss weights) may change
    ckpt = joint.save_pretrained(tmp_path / "ckpt")

    def from_ckpt(experts: str):
        stage.write_text(f"inherit: {RECIPE / 'heads.yaml'}\nmodel: {{experts: {experts}}}\n")
        return build_joint(load_config(stage, [f"--out_dir={tmp_path}", f"--model.init={ckpt}"]))

    torch.manual_seed(0)
    from_ckpt("{}")
    state = torch.get_rng_state()
    torch.manual_seed(0)
    loaded = from_ckpt("{seg: {dice_weight: 3.0}}")
    assert torch.equal(torch.get_rng_state(), state)  # rebuilding the expert drew no extra random numbers
    # saved with it (heads.yaml adds llm_context and detail)
    assert loaded.experts["seg"].spec.options == {"bce_weight": 0.5, "dice_weight": 3.0, "llm_context": True,
                                                  "detail": True}
    assert loaded.experts["seg"].options.dice_weight == 3.0
    assert loaded.experts["det"].options.box_head == "localizing"
    for name, expert in joint.experts.items():
        for key, value in expert.state_dict().items():
            assert torch.equal(loaded.experts[name].state_dict()[key], value), (name, key)
    with pytest.raises(ConfigError, match="change its parameters"):  # the box head is architecture
        from_ckpt("{det: {box_head: mlp, score_head: slot}}")
    # an option may add parameters: the center map starts fresh, everything trained is kept
    centered = from_ckpt("{det: {score_head: center}}").experts["det"]
    assert centered.center_head is not None
    for key, value in joint.experts["det"].state_dict().items():
        assert torch.equal(centered.state_dict()[key], value), key
    # a changed head starts fresh when the stage names it (model.fresh); the rest of the expert is kept
    ckpt = joint.set_expert_options({"det": {"score_head": "center"}}).save_pretrained(tmp_path / "centered")
    with pytest.raises(ConfigError, match="model.fresh"):  # center -> match replaces the center head
        from_ckpt("{det: {score_head: match}}")
    stage.write_text(f"inherit: {RECIPE / 'heads.yaml'}\nmodel: {{experts: {{det: {{score_head: match}}}}, "
                     "fresh: [det.center_head]}\n")
    matched = build_joint(load_config(stage, [f"--out_dir={tmp_path}", f"--model.init={ckpt}"])).experts["det"]
    assert type(matched.center_head).__name__ == "MatchCenterHead"
    new = matched.state_dict()  # heads.yaml also adds llm_context: its projection is new as well
    kept = {k: v for k, v in joint.experts["det"].state_dict().items() if not k.startswith("center_head.")}
    assert len(kept) > 10 and all(torch.equal(new[k], v) for k, v in kept.items())
    torch.manual_seed(0)  # a whole expert named fresh is its initialization from the RNG's state at the call
    whole = copy.deepcopy(joint).set_expert_options({"seg": {"query_match": True}}, ["seg"]).experts["seg"]
    torch.manual_seed(0)
    want = type(whole)(whole.spec).state_dict()
    assert whole.state_dict().keys() == want.keys() and "match.proj.weight" in want
    assert all(torch.equal(v, want[k]) for k, v in whole.state_dict().items())
    assert not torch.equal(whole.state_dict()["query_proj.net.0.weight"],
                           joint.experts["seg"].state_dict()["query_proj.net.0.weight"])
    for fresh, match in [("det.centre_head", "no such module"), ("dte.center_head", "expected '<expert>'"),
                         ("det.", "expected '<expert>'")]:
        with pytest.raises(ConfigError, match=match):
            joint.set_expert_options({}, [fresh])
    stage.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\nmodel: {{fresh: [det.center_head]}}\n")
    with pytest.raises(ConfigError, match="all start fresh"):  # a fresh recipe model has nothing to keep
        build_joint(load_config(stage, overrides(tmp_path)))
    with pytest.raises(ConfigError, match="dice_wieght"):
        from_ckpt("{seg: {dice_wieght: 2.0}}")
    with pytest.raises(ConfigError, match="experts \\['det', 'seg', 'track'\\]"):
        from_ckpt("{sag: {dice_weight: 2.0}}")


def test_recipe_projector_pools_the_llms_tokens_while_experts_read_the_full_grid(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\nmodel: {{projector: {{pool: 2}}}}\n")
    joint = build_joint(load_config(stage, overrides(tmp_path)))  # 48 px: a 3 x 3 stride-16 grid
    mllm = joint.mllm
    assert mllm.vision.grid == (3, 3) and mllm.config.projector.pool == 2
    feats, visual = mllm.encode_images(torch.zeros(1, 3, 48, 48))
    assert feats.shape[1] == 9 and visual.shape[1] == 4  # 3 x 3 patches for the experts, 2 x 2 tokens for the LLM
    assert mllm.processor.tokens_per_frame == 4
    assert joint.experts["det"].spec.grid == (3, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"inherit: {RECIPE / 'pretrain.yaml'}\nmodel: {{projector: {{pooling: 2}}}}\n")
    with pytest.raises(ConfigError, match=r"model.projector: unknown keys \['pooling'\]"):
        build_joint(load_config(bad, overrides(tmp_path)))


def _aux(joint, cfg):
    return build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs()))


def test_focus_targets_and_loss_against_hand_computed_values():
    from taskmllm.data.sample import Grounding, ObjectGT, Sample
    from taskmllm.model.expert_inputs import ExpertInputs
    from taskmllm.training.aux import AuxContext, AuxStates, FocusLoss, FocusOptions
    from taskmllm.training.aux_targets import grounding_cover

    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:2] = True  # half of the top-left 4 x 4 cell, nothing elsewhere
    other = np.zeros((8, 8), bool)
    other[4:8, 4:8] = True  # all of the bottom-right cell, but not named
    boxed = ObjectGT(3, "thing", box=np.array([4.0, 0.0, 8.0, 2.0]))  # no mask: its box counts, half a cell
    objs = [ObjectGT(1, "circle", mask=mask), ObjectGT(2, "square", mask=other), boxed]
    image = np.zeros((8, 8, 3), np.uint8)
    named = Sample("a", "any", image=image, objects=objs, grounding=Grounding("the circle", (1,)))
    absent = Sample("b", "any", image=image, objects=objs, grounding=Grounding("a star", ()))
    caption = Sample("c", "any", image=image, objects=objs, grounding=None)
    box_only = Sample("d", "any", image=image, objects=objs, grounding=Grounding("the thing", (3,)))
    targets, valid = grounding_cover([named, absent, caption, box_only], (2, 2), 8)
    # coverage 8/16 = 0.5 doubled -> 1; the unnamed square gives nothing; () -> all zero; None -> not valid
    assert torch.equal(targets, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assert valid.tolist() == [True, True, False, True]
    loss = FocusLoss(FocusOptions(pos_weight=3.0), AuxContext(hidden_size=4, vision_width=2, num_layers=1))
    hidden = torch.randn(4, 6, 4)
    visual = torch.zeros(4, 6, dtype=torch.bool)
    visual[:, 1:5] = True
    inputs = ExpertInputs(torch.zeros(4, 4, 2), (2, 2), 8, [1] * 4, [(8, 8)] * 4, visual_grid=(2, 2))
    states = AuxStates((hidden * 0, hidden), visual, inputs, max_frames=8)  # layer 1's output is ``hidden``
    lin = loss.linear
    logits = (hidden[:, 1:5] @ lin.weight.T + lin.bias).squeeze(-1)[[0, 1, 3]]  # the valid frames
    t = targets[[0, 1, 3]]
    p = torch.sigmoid(logits)
    want = -(3.0 * t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()  # BCE with pos_weight, by hand
    assert torch.allclose(loss.loss(states, [named, absent, caption, box_only]), want, atol=1e-6)
    with pytest.raises(ConfigError, match="layer must be in 1..1"):
        FocusLoss(FocusOptions(layer=0), AuxContext(4, 2, 1))


def test_aux_bad_settings_are_typed_errors(tmp_path):
    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.focus.layer=9"))
    with pytest.raises(ConfigError, match=r"stage.aux.focus: layer must be in 1..1"):
        _aux(build_joint(cfg), cfg)
    with pytest.raises(ConfigError, match=r"unknown auxiliary loss 'fokus' \(did you mean 'focus'\?\)"):
        load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.fokus.weight=1.0"))
    with pytest.raises(ConfigError, match=r"unknown key 'stage.aux.attr.label'"):
        load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.attr.label=[color]"))
    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.attr.labels=[texture]"))
    with pytest.raises(ConfigError, match=r"stage.aux.attr: labels \['texture'\]: the data sources declare classes "
                                          r"for \['category', 'color', 'size'\]"):
        _aux(build_joint(cfg), cfg)


def test_label_maps_by_hand():
    """Each token takes the class of the object covering most of it when that is >= half, else background."""
    from taskmllm.data.sample import ObjectGT, Sample
    from taskmllm.training.aux_targets import label_maps

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # the whole top-left cell
    a[2:4, 2:3] = True  # half of the bottom-right cell
    b[0:1, 2:4] = True  # half of the top-right cell
    objs = [ObjectGT(1, "circle", mask=a, labels={"color": "red"}), ObjectGT(2, "star", mask=b, labels={"color": "x"})]
    sample = Sample("s", "any", image=np.zeros((4, 4, 3), np.uint8), objects=objs)
    maps = label_maps([sample], (2, 2), 1, {"category": ("star", "circle"), "color": ("red",)})
    assert maps["category"].tolist() == [[2, 1, 0, 2]]  # star's half counts; a's half of the last cell counts
    assert maps["color"].tolist() == [[1, 0, 0, 1]]  # "x" is not a class: background


def test_attr_loss_equals_the_heads_on_the_llms_hidden_states_by_hand(tmp_path):
    """``stage.aux.attr`` (here alone): the logged ``attr`` part is the per-label linear classifiers' summed
    cross-entropy on the LLM's hidden states after ``layer`` blocks at the visual tokens, against the per-token
    labels of the LLM's (pooled) grid; the oracle runs the HF LLM with ``output_hidden_states``."""
    import torch.nn.functional as F

    from taskmllm.data.shapesworld import COLORS, SHAPES, WorldConfig, shapesworld_dataset
    from taskmllm.model.processor import positions
    from taskmllm.training.aux_targets import label_maps
    from taskmllm.training.trainee import Trainee, forward_loss

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux={attr: {layer: 1, labels: "
                      "[category, color]}}", "--model.llm.num_hidden_layers=2"))  # 2 blocks: HF's last state is normed
    joint = build_joint(cfg).eval()
    aux = _aux(joint, cfg)
    assert set(aux) == {"attr"}
    data = shapesworld_dataset({"color": 1.0, "exist": 1.0}, 3, seed=0, config=WorldConfig(image_size=48))
    samples = [data[i] for i in range(3)]
    with torch.no_grad():
        _, parts = forward_loss(Trainee(joint, aux), samples, torch.device("cpu"))
        mllm = joint.mllm
        batch = mllm.processor.conversations([s.turns for s in samples], [s.image for s in samples])
        emb = mllm.embed(batch.input_ids, mllm.encode_images(batch.pixel_values)[1])
        out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask), output_hidden_states=True)
        hidden = out.hidden_states[1][batch.input_ids == mllm.image_id]  # (F * N', H)
        grid = mllm.projector.pooled_grid(mllm.vision.grid)
        maps = label_maps(samples, grid, mllm.config.max_frames, {"category": SHAPES, "color": tuple(COLORS)})
        heads = aux["attr"].heads
        want = (F.cross_entropy(heads["category"](hidden), maps["category"].flatten())
                + F.cross_entropy(heads["color"](hidden), maps["color"].flatten()))
    assert float(parts["attr"]) == pytest.approx(float(want), rel=1e-5)
    assert heads["category"].out_features == len(SHAPES) + 1 and heads["color"].out_features == len(COLORS) + 1
