"""The typed config tree (diffmoe_dist/config.py): YAML + --set overrides, presets, and every user
error raised as a ValueError that names the dotted key and the numbers involved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffmoe_dist.config import (
    Config,
    load_config,
    parse_overrides,
    save_config,
    validate_layout,
)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------------------------
# loading and overrides


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.moe.capacity == 1.0 and cfg.moe.threshold_decay == 0.95
    assert cfg.train.betas == (0.9, 0.999)


def test_yaml_load(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "model:\n  depth: 6\n  hidden_size: 64\n  num_heads: 4\n"
        "moe:\n  mode: ec\n  num_experts: 8\n  capacity: 0.5\n"
        "train:\n  betas: [0.8, 0.95]\n  steps: 7\n"
        "run:\n  wandb: true\n",
    )
    cfg = load_config(p)
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads) == (6, 64, 4)
    assert (cfg.moe.mode, cfg.moe.num_experts, cfg.moe.capacity) == ("ec", 8, 0.5)
    assert cfg.train.betas == (0.8, 0.95) and isinstance(cfg.train.betas, tuple)
    assert cfg.train.steps == 7 and cfg.run.wandb is True
    # Keys not in the file keep their defaults.
    assert cfg.train.seed == 0 and cfg.model.patch_size == 2


def test_set_overrides_are_typed_and_repeatable(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  steps: 7\n  seed: 1\n")
    cfg = load_config(
        p,
        [
            "train.steps=11",  # int, overrides the file
            "moe.capacity=1.25",  # float
            "moe.gamma=0.5",
            "run.wandb=true",  # bool
            "moe.predictor=false",
            "train.betas=[0.5, 0.75]",  # tuple
            "run.dir=/tmp/x",  # str
            "train.seed=2",
            "train.seed=3",  # repeated: the last one wins
        ],
    )
    assert cfg.train.steps == 11 and isinstance(cfg.train.steps, int)
    assert cfg.moe.capacity == 1.25 and isinstance(cfg.moe.capacity, float)
    assert cfg.moe.gamma == 0.5
    assert cfg.run.wandb is True and cfg.moe.predictor is False
    assert cfg.train.betas == (0.5, 0.75) and isinstance(cfg.train.betas, tuple)
    assert cfg.run.dir == "/tmp/x"
    assert cfg.train.seed == 3


def test_int_given_for_float_field_is_converted() -> None:
    cfg = load_config(None, ["moe.capacity=2", "model.mlp_ratio=2"])
    assert cfg.moe.capacity == 2.0 and isinstance(cfg.moe.capacity, float)
    assert isinstance(cfg.model.mlp_ratio, float)


def test_float_in_exponent_notation() -> None:
    """`--set train.lr=1e-4` (the paper's LR, as everyone writes it) must load as 1e-4.

    PyYAML follows YAML 1.1, where `1e-4` (no dot) is the *string* '1e-4', so today this raises
    "config key 'train.lr': expected a number, got '1e-4'". The same happens for `lr: 1e-4` in a file.
    """
    cfg = load_config(None, ["train.lr=1e-4", "train.betas=[0.9, 1e-3]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.betas[1] == pytest.approx(1e-3)


def test_parse_overrides_nesting() -> None:
    tree = parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f=true", "g=none"])
    assert tree == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2], "f": True, "g": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["no_equals_sign"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["=3"])


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=DiffMoE-S-E8", "train.betas=[0.8, 0.9]", "train.steps=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


# --------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.bogus=1", "model.bogus"),
        ("moe.num_expert=4", "moe.num_expert"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_unknown_key_names_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert f"'{key}" in str(e.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  stpes: 3\n")
    with pytest.raises(ValueError, match=r"train\.stpes"):
        load_config(p)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("moe.capacity=big", "moe.capacity"),
        ("run.wandb=1", "run.wandb"),
        ("moe.mode=3", "moe.mode"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.betas=0.9", "train.betas"),
        ("train.steps=true", "train.steps"),
        ("train.betas.x=1", "train.betas"),
    ],
)
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_section_given_a_scalar() -> None:
    with pytest.raises(ValueError, match="'model'"):
        load_config(None, ["model=3"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  depth: [1, 2\n  hidden_size: 3\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(p)
    p = write(tmp_path, "- just\n- a list\n", name="list.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)


@pytest.mark.parametrize("n", [0, -2])
def test_num_experts_below_one(n: int) -> None:
    with pytest.raises(ValueError, match=r"moe\.num_experts"):
        load_config(None, [f"moe.num_experts={n}"])


@pytest.mark.parametrize("key", ["moe.capacity", "moe.infer_capacity"])
@pytest.mark.parametrize("value", [0, -0.5])
def test_capacity_not_positive(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_fp16_refused() -> None:
    with pytest.raises(ValueError, match="fp16"):
        load_config(None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"


def test_ep_must_divide_num_experts() -> None:
    with pytest.raises(ValueError, match=r"parallel\.ep=3.*num_experts=16"):
        load_config(None, ["parallel.ep=3"])
    assert load_config(None, ["parallel.ep=4"]).parallel.ep == 4


def test_other_impossible_values() -> None:
    for override in [
        "moe.mode=switch",
        "moe.pool_samples=0",
        "moe.gamma=1.0",
        "moe.threshold_decay=1.0",
        "model.num_heads=5",  # 384 % 5
        "model.patch_size=3",  # 32 % 3
        "train.ema_decay=1.0",
    ]:
        with pytest.raises(ValueError):
            load_config(None, [override])
    # ec with the default static inference rule is fine; a predictor rule without the predictor
    # is refused, naming infer_mode.
    assert load_config(None, ["moe.mode=ec"]).moe.mode == "ec"
    with pytest.raises(ValueError, match=r"moe\.infer_mode"):
        load_config(None, ["moe.mode=ec", "moe.infer_mode=dynamic"])


# --------------------------------------------------------------------------------------------------
# layout


def layout_cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_layout_batch_not_divisible_by_world() -> None:
    cfg = layout_cfg("train.global_batch_size=10", "moe.pool_samples=1")
    with pytest.raises(ValueError, match=r"global_batch_size=10.*world size 4"):
        validate_layout(cfg, 4)


def test_layout_ep_must_divide_world() -> None:
    cfg = layout_cfg("parallel.ep=4", "train.global_batch_size=12", "moe.pool_samples=2")
    with pytest.raises(ValueError, match=r"parallel\.ep=4.*world size 6"):
        validate_layout(cfg, 6)


def test_layout_pool_within_rank() -> None:
    # global 256 on 4 ranks: micro-batch 64; pools of 16 -> 4 pools per rank.
    info = validate_layout(layout_cfg("train.global_batch_size=256", "moe.pool_samples=16"), 4)
    assert info == {"world_size": 4, "ep": 1, "dp": 4, "micro_batch": 64, "pool_span": 1}


def test_layout_pool_spanning_ranks() -> None:
    # global 24 on 4 ranks: micro-batch 6; pool of 12 = 2 x micro-batch, needs 2 | ep.
    cfg = layout_cfg("train.global_batch_size=24", "moe.pool_samples=12", "parallel.ep=2")
    info = validate_layout(cfg, 4)
    assert info["pool_span"] == 2 and info["dp"] == 2 and info["micro_batch"] == 6
    # ep = 1: the pool would span 2 ranks that are not in one expert-parallel group.
    cfg = layout_cfg("train.global_batch_size=24", "moe.pool_samples=12")
    with pytest.raises(ValueError, match=r"pool_samples=12.*micro-batch is 6"):
        validate_layout(cfg, 4)


def test_layout_pool_neither_divides_nor_multiple() -> None:
    # micro-batch 6, pool 4: 4 does not divide 6 and is not a multiple of 6.
    cfg = layout_cfg("train.global_batch_size=24", "moe.pool_samples=4", "parallel.ep=2")
    with pytest.raises(ValueError, match="cannot realise"):
        validate_layout(cfg, 4)


def test_layout_pool_must_divide_global_batch() -> None:
    cfg = layout_cfg("train.global_batch_size=256", "moe.pool_samples=48")
    with pytest.raises(ValueError, match=r"pool_samples=48.*global_batch_size=256"):
        validate_layout(cfg, 1)


def test_layout_pool_irrelevant_for_ec_and_dense() -> None:
    for mode in ("ec", "dense"):
        cfg = layout_cfg(f"moe.mode={mode}", "train.global_batch_size=24", "moe.pool_samples=5")
        assert validate_layout(cfg, 4)["pool_span"] == 1


# --------------------------------------------------------------------------------------------------
# model presets


def test_preset_applied() -> None:
    cfg = load_config(None, ["model.name=DiffMoE-L-E8"])
    m = cfg.model
    assert (m.name, m.depth, m.hidden_size, m.num_heads) == ("DiffMoE-L-E8", 24, 1024, 16)
    assert (cfg.moe.mode, cfg.moe.num_experts) == ("diffmoe", 8)
    cfg = load_config(None, ["model.name=TC-DiT-B-E16"])
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.moe.mode, cfg.moe.num_experts) == (
        12,
        768,
        "tc",
        16,
    )
    assert load_config(None, ["model.name=Dense-DiT-XL"]).moe.mode == "dense"


def test_preset_then_explicit_keys_override(tmp_path: Path) -> None:
    # Explicit keys win over the preset whatever their source or position in the file.
    p = write(
        tmp_path,
        "model:\n  depth: 4\n  name: DiffMoE-L-E16\n  input_size: 16\nmoe:\n  num_experts: 4\n",
    )
    cfg = load_config(p)
    assert cfg.model.depth == 4 and cfg.model.input_size == 16
    assert cfg.model.hidden_size == 1024 and cfg.model.num_heads == 16  # from the preset
    assert cfg.moe.num_experts == 4 and cfg.moe.mode == "diffmoe"
    # The name set on the command line still lets the file's explicit keys win.
    p = write(tmp_path, "model:\n  depth: 2\n", name="d.yaml")
    cfg = load_config(p, ["model.name=DiffMoE-B-E8", "moe.num_experts=2"])
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.moe.num_experts) == (2, 768, 2)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"model\.name.*DiffMoE-M-E16"):
        load_config(None, ["model.name=DiffMoE-M-E16"])


# --------------------------------------------------------------------------------------------------
# every choice's names are written once, where the choice is implemented


# constant -> the module that defines it (config.py and the rest import it from there)
CHOICE_HOMES = {
    "ROUTING_MODES": "diffmoe_dist.models.moe",
    "MOE_MODES": "diffmoe_dist.models.moe",
    "INFER_RULES": "diffmoe_dist.models.moe",
    "PREDICTOR_RULES": "diffmoe_dist.models.moe",
    "EXPERT_CHOICE_MODES": "diffmoe_dist.models.moe",
    "POOLED_MODES": "diffmoe_dist.models.moe",
    "FLOW_SAMPLERS": "diffmoe_dist.transport.samplers",
    "DDPM_SAMPLERS": "diffmoe_dist.transport.ddpm",
    "OBJECTIVES": "diffmoe_dist.transport.objective",
    "POOL_MODES": "diffmoe_dist.transport.cfg",
    "GROUP_SOURCES": "diffmoe_dist.parallel.groups",
    "SAMPLE_PRECISIONS": "diffmoe_dist.parallel.numerics",
    "LATENT_VERIFY_MODES": "diffmoe_dist.config",
    "CAPACITY_SCHEDULES": "diffmoe_dist.config",
}


def test_each_choice_list_is_written_once() -> None:
    """A tuple / list / set literal of strings equal (as a set) to one of the choice lists may
    appear only in the assignment that defines it: a second copy would drift from the first."""
    import ast
    import importlib

    repo = Path(__file__).resolve().parents[1]
    values = {}
    for name, module in CHOICE_HOMES.items():
        values[frozenset(getattr(importlib.import_module(module), name))] = (name, module)
    copies = []
    for path in sorted([*repo.glob("diffmoe_dist/**/*.py"), *repo.glob("tools/*.py")]):
        module = ".".join(path.relative_to(repo).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        defining = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name) and CHOICE_HOMES.get(target.id) == module
        }
        # a typing.Literal[...] in the home module is the definition too (the constant is get_args)
        literal = {
            id(node.slice)
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal"
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or id(node) in defining:
                continue
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(items) == len(node.elts) >= 2 and all(isinstance(v, str) for v in items):
                hit = values.get(frozenset(items))
                if hit is not None and not (id(node) in literal and hit[1] == module):
                    copies.append(f"{module}:{node.lineno} repeats {hit[1]}.{hit[0]}")
    assert not copies, copies


def test_config_accepts_exactly_the_implemented_choices() -> None:
    from diffmoe_dist.models.moe import INFER_RULES, ROUTING_MODES
    from diffmoe_dist.parallel.groups import GROUP_SOURCES
    from diffmoe_dist.transport.ddpm import DDPM_SAMPLERS
    from diffmoe_dist.transport.samplers import FLOW_SAMPLERS

    for mode in ROUTING_MODES:
        assert load_config(None, [f"moe.mode={mode}"]).moe.mode == mode
    pred = ["moe.mode=diffmoe", "moe.predictor=true"]
    for rule in INFER_RULES:
        assert load_config(None, [*pred, f"moe.infer_mode={rule}"]).moe.infer_mode == rule
    for source in GROUP_SOURCES:
        assert load_config(None, [f"parallel.groups={source}"]).parallel.groups == source
    for sampler in FLOW_SAMPLERS:
        assert load_config(None, [f"sample.sampler={sampler}"]).sample.sampler == sampler
    for sampler in DDPM_SAMPLERS:
        cfg = load_config(None, ["objective=ddpm", f"sample.sampler={sampler}"])
        assert cfg.sample.sampler == sampler
    for key, bad in [
        ("moe.mode", "topk"),
        ("moe.infer_mode", "greedy"),
        ("parallel.groups", "nccl"),
        ("sample.sampler", "rk4"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_config(None, [*pred, f"{key}={bad}"])
