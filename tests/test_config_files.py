"""`--config FILE` in JSON, TOML or YAML and `--print-config --format`: parse errors name the file and line, unknown
keys stay errors, and every train and sweep command's printed config reads back to the identical config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import dump_config, read_config_file
from harness.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "harness" / "sample"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ reading


def test_the_three_formats_read_the_same_mapping(tmp_path):
    want = {"loop": {"lr": 1e-4, "max_steps": 10, "epochs": None, "mixed_precision": "no"}, "rank": 8}
    files = [
        _write(tmp_path, "c.json", json.dumps(want)),
        _write(tmp_path, "c.toml", 'null = ["loop.epochs"]\nrank = 8\n[loop]\nlr = 1e-4\nmax_steps = 10\n'
                                   'mixed_precision = "no"\n'),
        # YAML as people write it: `no` and `1e-4` unquoted read as YAML 1.2 / JSON do (a string, a float).
        _write(tmp_path, "c.yaml", "loop:\n  lr: 1e-4\n  max_steps: 10\n  epochs: null\n  mixed_precision: no\n"
                                   "rank: 8\n"),
        _write(tmp_path, "c.yml", "loop: {lr: 0.0001, max_steps: 10, epochs: ~, mixed_precision: 'no'}\nrank: 8\n"),
    ]
    for f in files:
        assert read_config_file(f) == want, f.name


def test_other_extensions_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"\.json, \.toml, \.yaml, \.yml"):
        read_config_file(_write(tmp_path, "c.ini", "[loop]\nlr = 1\n"))


@pytest.mark.parametrize("name, text, line", [
    ("bad.json", '{\n  "loop": {\n    "lr": 1e-4,\n  }\n}\n', 4),
    ("bad.toml", "[loop]\nlr = 1e-4\nmax_steps 10\n", 3),
    ("bad.yaml", "loop:\n  lr: 1e-4\n  max_steps: [10\nrank: 4\n", 4),
])
def test_a_parse_error_is_one_line_naming_file_and_line(tmp_path, run_cli, name, text, line):
    path = _write(tmp_path, name, text)
    with pytest.raises(UserError) as e:
        read_config_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: not valid {name.split('.')[1].upper()}") and "\n" not in msg
    code, _, err = run_cli("train", "sd", "--split", tmp_path / "s.json", "--data", tmp_path, "--config", path,
                           "--print-config")
    assert code == 2 and f"{path}:{line}:" in err and len(err.strip().splitlines()) == 1


def test_a_key_given_twice_is_refused_in_every_format(tmp_path):
    for name, text in (("d.json", '{"loop": {"lr": 1, "lr": 2}}'), ("d.yaml", "loop:\n  lr: 1\n  lr: 2\n"),
                       ("d.toml", "[loop]\nlr = 1\nlr = 2\n")):
        with pytest.raises(UserError, match="lr|twice|[Dd]uplicate|overwrite") as e:
            read_config_file(_write(tmp_path, name, text))
        assert str(e.value).startswith(str(tmp_path / name)), e.value
    with pytest.raises(UserError) as e:
        read_config_file(_write(tmp_path, "l.yaml", "loop:\n  lr: 1\n  lr: 2\n"))
    assert str(e.value).startswith(f"{tmp_path / 'l.yaml'}:3: ")


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(UserError, match="mapping"):
        read_config_file(_write(tmp_path, "c.yaml", "- 1\n- 2\n"))


def test_toml_null_list_conflicts_are_refused(tmp_path):
    with pytest.raises(UserError, match="also sets"):
        read_config_file(_write(tmp_path, "c.toml", 'null = ["loop.lr"]\n[loop]\nlr = 1.0\n'))
    with pytest.raises(UserError, match="list of dotted keys"):
        read_config_file(_write(tmp_path, "c.toml", "null = 3\n"))


def test_printed_keys_and_a_sweeps_per_cell_nulls_are_dropped_on_reading(tmp_path):
    f = _write(tmp_path, "c.json", json.dumps({"loop": {"lr": None, "derived": {"x": 1}, "seed": 1},
                                               "rank": None, "sweep": {"grid": {"loop.lr": [1, 2]}}}))
    assert read_config_file(f, ("loop.derived", "sweep")) == {"loop": {"seed": 1}, "rank": None}


# ------------------------------------------------------------------------------------------------ writing


def test_dump_round_trips_every_json_value_in_every_format(tmp_path):
    data = {"a": None, "s": "no", "t": "1e-4", "d": "2024-01-01", "y": "yes", "n": "null", "inf": float("inf"),
            "loop": {"epochs": None, "lr": 1e-6, "xs": [1, 2.5, "x"], "deep": {"k": None, "v": True}},
            "sweep": {"grid": {"loop.lr": [1e-4, 2e-4]}}, "empty": {}, "p": Path("/x/y")}
    plain = json.loads(json.dumps(data, default=str))
    for fmt in ("json", "toml", "yaml"):
        f = _write(tmp_path, f"c.{fmt}", dump_config(data, fmt))
        assert read_config_file(f) == plain, fmt


def test_toml_refuses_what_it_cannot_hold_faithfully():
    with pytest.raises(UserError, match="list holding null"):
        dump_config({"xs": [1, None]}, "toml")
    with pytest.raises(UserError, match="has a dot"):
        dump_config({"grid": {"loop.lr": None}}, "toml")
    with pytest.raises(UserError, match="key named 'null'"):
        dump_config({"null": 1}, "toml")


# ------------------------------------------------------------------------------------------------ the commands


def _commands() -> list[tuple[str, str]]:
    from harness.cli import cli

    def takes_config(c) -> bool:  # the reference families (retrieval, test-pattern) train nothing: no config
        return {"config_file", "print_config"} <= {p.name for p in c.params}

    return [(g, n) for g in ("train", "sweep") for n, c in sorted(cli.commands[g].commands.items())
            if takes_config(c)]


COMMANDS = _commands()


def test_every_train_command_is_covered():
    names = {n for g, n in COMMANDS if g == "train"}
    assert {"msdm-vae", "msdm-unet", "kandinsky-prior", "kandinsky-decoder", "sd", "kandinsky3"} <= names
    assert {n for g, n in COMMANDS if g == "sweep"} >= {"msdm-unet", "sd", "kandinsky3", "kandinsky-prior"}


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    from harness.cli import main

    out = tmp_path_factory.mktemp("split") / "split.json"
    with pytest.raises(SystemExit) as e:
        main(["split", str(SAMPLE), "--out", str(out), "--val-images", "8"])
    assert e.value.code == 0
    return out


def _fake_vae_run() -> Path:
    """What msdm-unet reads of its --vae run to resolve a config (the run's config and final/vae)."""
    from harness.io import write_json
    from harness.runs import create_run

    run = create_run("msdm-vae", {"preset": "tiny", "data": {"resolution": 64}}, {}, run_id="vae-for-config")
    (run.dir / "final" / "vae").mkdir(parents=True)
    write_json(run.dir / "final" / "vae" / "config.json", {})
    return run.dir


@pytest.mark.parametrize("group, name", COMMANDS, ids=[f"{g}-{n}" for g, n in COMMANDS])
def test_print_config_in_each_format_reads_back_to_the_identical_config(tmp_path, run_cli, split_file, group,
                                                                        name, monkeypatch):
    """Options that differ from the defaults (--max-steps clears a preset's epochs: a null in TOML) are given once;
    the second call gives only what --config cannot (the required --split/--data, a sweep's --grid)."""
    if name == "kandinsky3":  # its printed memory estimate (a printed-only key) builds the 3 B U-Net on meta: ~30 s
        import models.kandinsky3.memory

        monkeypatch.setattr(models.kandinsky3.memory, "estimate", lambda *a, **k: {"stand-in": list(map(str, a))})
    required = [group, name, "--split", split_file, "--data", SAMPLE]
    if group == "sweep":
        required += ["--grid", "lr=1e-4,2e-4"]
    first = [*required, "--max-steps", "7", "--seed", "3", "--batch-size", "3"]
    if name == "msdm-unet":
        first += ["--vae", _fake_vae_run()]
    if name in ("kandinsky-prior", "kandinsky-decoder"):
        first += ["--preset", "paper"]
    code, printed_json, err = run_cli(*first, "--print-config")
    assert code == 0, err
    want = json.loads(printed_json)
    assert want["loop"]["max_steps"] == 7 and want["loop"]["epochs"] is None
    for fmt in ("json", "toml", "yaml"):
        code, text, err = run_cli(*first, "--print-config", "--format", fmt)
        assert code == 0, err
        f = _write(tmp_path, f"printed.{fmt}", text)
        assert read_config_file(f) == want  # the same config in every format (printed keys included)
        code, again, err = run_cli(*required, "--config", f, "--print-config", "--format", fmt)
        assert code == 0, err
        assert again == text, fmt


def test_unknown_keys_in_toml_and_yaml_are_errors(tmp_path, run_cli, split_file):
    for name, text in (("bad.toml", "[loop]\nmax_stepz = 3\n"), ("bad.yaml", "loop:\n  max_stepz: 3\n")):
        f = _write(tmp_path, name, text)
        code, _, err = run_cli("train", "sd", "--split", split_file, "--data", SAMPLE, "--config", f,
                               "--print-config")
        assert code == 2 and "max_stepz" in err, err


def test_a_printed_msdm_config_is_refused_by_the_other_msdm_command(tmp_path, run_cli, split_file):
    code, text, err = run_cli("train", "msdm-vae", "--split", split_file, "--data", SAMPLE, "--print-config",
                              "--format", "yaml")
    assert code == 0, err
    f = _write(tmp_path, "vae.yaml", text)
    code, _, err = run_cli("train", "msdm-unet", "--split", split_file, "--data", SAMPLE, "--vae", _fake_vae_run(),
                           "--config", f, "--print-config")
    assert code == 2 and "config is for msdm-vae, not msdm-unet" in err


def test_format_without_print_config_is_refused(tmp_path, run_cli, split_file):
    for fmt in ("toml", "json"):  # also the default, when given
        code, _, err = run_cli("train", "sd", "--split", split_file, "--data", SAMPLE, "--format", fmt)
        assert code == 2 and "--format applies to --print-config" in err


def test_format_applies_to_what_prints_a_config_only(run_cli, monkeypatch):
    import models.kandinsky3.memory

    monkeypatch.setattr(models.kandinsky3.memory, "estimate", lambda *a, **k: {"stand-in": True})
    code, out, err = run_cli("train", "kandinsky3", "--split", "s.json", "--data", ".", "--dry-run", "--format",
                             "yaml")  # Kandinsky 3's --dry-run prints the config with its estimate
    assert code == 0 and "estimate:\n  stand-in: true" in out, err
    for args in (["sweep", "kandinsky-prior", "--ranks", "4", "--dry-run"],
                 ["sweep", "sd", "--grid", "rank=4,8", "--dry-run"]):  # these print a plan table
        code, _, err = run_cli(*args, "--format", "toml")
        assert code == 2 and "--format applies to --print-config" in err, (args, err)


def test_paraphrase_reads_toml_and_yaml_configs_too(tmp_path, run_cli):
    """`harness paraphrase --config` goes through the same reader (--dry-run sends nothing)."""
    bad = _write(tmp_path, "p.yaml", "temperatur: 0.5\n")
    code, _, err = run_cli("paraphrase", SAMPLE, "--out", tmp_path / "p.jsonl", "--config", bad, "--dry-run")
    assert code == 2 and "temperatur" in err
    good = _write(tmp_path, "p.toml", "temperature = 0.5\nper_caption = 2\n")
    code, out, err = run_cli("paraphrase", SAMPLE, "--out", tmp_path / "p.jsonl", "--config", good, "--dry-run")
    assert code == 0, err
