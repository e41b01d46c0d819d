"""CLI of the SD family: `register(cli, train, sweep, models)` adds `harness train sd`, `harness sweep sd`,
`harness models info sd` and `harness models make-tiny sd` (the click commands are in commands.py), and
`build_config` turns their options into an SDConfig (defaults <- --preset <- --config file <- options).

This module does not import harness.cli at import time: harness.cli's root imports it (through harness/cli/sd.py)
while registering the areas, and a module-level import back would be circular.
"""

from __future__ import annotations

from typing import Any


def register(cli, train, sweep, models) -> None:
    from harness.cli.common import sweep_command
    from harness.families.sd.commands import make_tiny_sd, models_info_sd, train_sd

    train.add_command(train_sd)
    sweep.add_command(sweep_command(train_sd, "harness.families.sd.sweep:SD", build_config,
                                    plan="harness.families.sd.sweep:plan_table"))
    models.commands["info"].add_command(models_info_sd)
    models.commands["make-tiny"].add_command(make_tiny_sd)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else None


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# What --print-config adds to a config (resolved_config, a sweep's plan), dropped when --config reads it back.
PRINTED_KEYS = ("loop.derived", "note", "sweep")


def build_config(kwargs: dict[str, Any]):
    """defaults <- --preset <- --config file <- CLI options, then the typed config (unknown keys are errors)."""
    from harness.config import read_config_file, to_dict
    from harness.families.sd.config import SDConfig, config_from_dict, preset

    from harness.cli.common import pop_loop_overrides

    loop = pop_loop_overrides(kwargs)
    d = to_dict(SDConfig())
    config_file = kwargs.pop("config_file", None)
    file_cfg = {}
    if config_file:
        file_cfg = read_config_file(config_file, PRINTED_KEYS)
    name = kwargs.get("preset") or file_cfg.get("preset")  # a preset named in the file is applied, not just recorded
    if name:
        _merge(d, preset(name).overrides())
    _merge(d, file_cfg)
    if kwargs.get("preset"):
        d["preset"] = kwargs["preset"]
    over: dict[str, Any] = {"loop": dict(loop), "data": {}, "generation": {}}  # None in loop = clear (epochs)
    if kwargs.get("warmup_steps") is not None:
        over["loop"]["warmup_steps"] = kwargs["warmup_steps"]
    for opt in ("base", "revision", "method", "rank", "alpha", "optimizer", "text_encoder_lr", "clip_skip",
                "noise_offset", "multires_noise_iterations", "multires_noise_discount", "snr_gamma", "ema",
                "gradient_checkpointing", "cache", "base_dtype"):
        if kwargs.get(opt) is not None:
            over[opt] = kwargs[opt]
    for opt in ("components", "lora_targets"):
        if kwargs.get(opt) is not None:
            over[opt] = _csv(kwargs[opt])
    if kwargs.get("export") is not None:
        over["export_kohya"] = kwargs["export"] == "kohya"
    if kwargs.get("cache_dir") is not None:
        over["cache_dir"] = str(kwargs["cache_dir"])
    for opt in ("resolution", "fit", "captions", "caption_dropout", "paraphrase_strategy"):
        if kwargs.get(opt) is not None:
            over["data"][opt] = kwargs[opt]
    if loop.get("seed") is not None:
        over["data"]["seed"] = loop["seed"]
    for opt, key in (("sample_scheduler", "scheduler"), ("negative_prompt", "negative_prompt"),
                     ("height", "height"), ("width", "width")):
        if kwargs.get(opt) is not None:
            over["generation"][key] = kwargs[opt]
    for opt in ("data_dir", "split_path"):
        if kwargs.get(opt) is not None:
            over[opt] = str(kwargs[opt])
    if kwargs.get("paraphrases_path") is not None:
        over["paraphrases_path"] = str(kwargs["paraphrases_path"])
    _merge(d, over)
    cfg = config_from_dict(d, where=str(config_file) if config_file else "options")
    cfg.validate()
    return cfg


