"""The shipped DeepSpeed JSONs and accelerate YAMLs, the early config check, and the base-lr -> DeepSpeed pitfall."""

import json

import pytest
import yaml
from conftest import REPO

from hf_medvis.training.deepspeed_config import DeepSpeedConfigError, validate_deepspeed_config

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
AUTO_KEYS = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"]


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("ds")), per_device_train_batch_size=4, report_to="none"
    )


def test_the_four_configs_exist_use_auto_and_pass_deepspeeds_own_parser(args):
    assert [p.name for p in DS_CONFIGS] == ["zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    for path in DS_CONFIGS:
        raw = json.loads(path.read_text())
        assert all(raw[key] == "auto" for key in AUTO_KEYS), path.name
        assert set(raw["optimizer"]["params"].values()) == {"auto"} and raw["bf16"]["enabled"] == "auto"
        assert raw["fp16"]["enabled"] == "auto" and raw["zero_optimization"]["reduce_bucket_size"] == "auto"
        zero = raw["zero_optimization"]
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # saved weights load with from_pretrained
            assert zero["stage3_prefetch_bucket_size"] == zero["stage3_param_persistence_threshold"] == "auto"
        assert ("offload_optimizer" in zero) == ("offload" in path.name)
        filled = validate_deepspeed_config(path, args)
        assert (
            filled["train_micro_batch_size_per_gpu"] == 4 and filled["optimizer"]["params"]["lr"] == args.learning_rate
        )


def test_accelerate_configs_point_at_the_json_and_duplicate_nothing():
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.name for p in (REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert names == ["cpu.yaml", "ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"]
    for stage in (2, 3):
        path = REPO / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"
        config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail here
        assert config.distributed_type == "DEEPSPEED"
        assert config.deepspeed_config["deepspeed_config_file"] == f"ds_configs/zero{stage}.json"
        assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
        raw = yaml.safe_load(path.read_text())
        # accelerate rejects these next to deepspeed_config_file: the JSON holds them ("auto").
        duplicated = {
            "gradient_accumulation_steps",
            "gradient_clipping",
            "zero_stage",
            "offload_optimizer_device",
            "offload_param_device",
            "zero3_save_16bit_model",
        } & set(raw["deepspeed_config"])
        assert not duplicated and "mixed_precision" not in raw


def _base() -> dict:
    return json.loads((REPO / "ds_configs" / "zero2.json").read_text())


def _with(**changes) -> dict:
    config = _base()
    for dotted, value in changes.items():
        node, *path = dotted.split("__")
        target = config
        for key in [node, *path][:-1]:
            target = target.setdefault(key, {})
        target[[node, *path][-1]] = value
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        (_with(zero_optimisation={"stage": 2}), "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
        (_with(zero_optimization__stagee=2), "stagee: Extra inputs are not permitted"),
        (_with(zero_optimization__stage=4), "stage: Input should be 0, 1, 2"),
        (
            _with(train_micro_batch_size_per_gpu=8),
            "train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=4",
        ),
        (_with(train_batch_size=12), "train_batch_size=12 vs hf train_batch_size (calculated)=4"),
        (_with(fp16__enabled=True, bf16__enabled=True), "ds fp16.enabled=True vs hf fp16"),
        (_with(optimizer__params__lr=1.0), "optimizer.params.lr=1.0 vs hf learning_rate"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_key(args, config, message):
    with pytest.raises(DeepSpeedConfigError) as info:
        validate_deepspeed_config(config, args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fp16_and_bf16_together_are_refused_by_deepspeed(tmp_path):
    from transformers import TrainingArguments

    # TrainingArguments refuses --fp16 --bf16 itself; with --fp16 the JSON's literal bf16 is the contradiction.
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    args.fp16 = True  # set after __post_init__ (which rejects fp16 on CPU) to reach the DeepSpeed check
    with pytest.raises(DeepSpeedConfigError, match="bf16"):
        validate_deepspeed_config(_with(bf16__enabled=True), args)


def test_file_errors_are_clear(args, tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="file not found"):
        validate_deepspeed_config(tmp_path / "nope.json", args)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},}')
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        validate_deepspeed_config(tmp_path / "bad.json", args)


def test_derived_lr_reaches_a_deepspeed_config_filled_at_argument_time(tmp_path):
    """The pitfall: with --deepspeed, TrainingArguments fills "auto" in __post_init__, before the recipe derives its lr."""
    from transformers import TrainingArguments

    from hf_medvis.training.lr import apply_base_learning_rate

    args = TrainingArguments(
        output_dir=str(tmp_path),
        deepspeed=str(REPO / "ds_configs" / "zero2.json"),
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        report_to="none",
    )
    assert args.hf_deepspeed_config.config["optimizer"]["params"]["lr"] == 5e-5  # filled with the default already
    apply_base_learning_rate(args, 1.5e-4)
    assert args.learning_rate == pytest.approx(1.5e-4 * 64 / 256)
    assert args.hf_deepspeed_config.config["optimizer"]["params"]["lr"] == args.learning_rate
    assert args.deepspeed_plugin.deepspeed_config["optimizer"]["params"]["lr"] == args.learning_rate


def test_recipe_refuses_a_bad_config_before_writing_anything(tmp_path, phantom_dir):
    from conftest import load_recipe

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(_with(zero_optimization__stage=5)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        load_recipe("pretrain_mae").main(
            [
                "--deepspeed",
                str(bad),
                "--train_data",
                str(phantom_dir / "images"),
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
            ]
        )
    assert "stage: Input should be 0, 1, 2" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()
