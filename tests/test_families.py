"""The family registry: every command and run kind resolves through harness/families/registry.py; runs made before
the families moved into harness/families/ (config.json "family": "msdm-unet", "kandinsky-prior", ...) still load."""

from __future__ import annotations

import pytest

from harness.errors import UserError


def test_every_registered_reference_imports_and_every_kind_has_its_commands():
    from harness.cli import cli
    from harness.families.registry import FAMILIES, kinds, load_ref

    train, sweep = cli.commands["train"], cli.commands["sweep"]
    for fam in FAMILIES:
        for k in fam.kinds:
            for ref in (k.generator, k.sweep):
                if ref:
                    assert callable(load_ref(ref)) or hasattr(load_ref(ref), "train"), ref
            if fam.cli:
                assert k.name in train.commands, k.name
            if k.sweep:
                assert k.name in sweep.commands and load_ref(k.sweep).kind == k.name
    assert {k.name for k in kinds()} >= {"msdm-vae", "msdm-unet", "kandinsky-prior", "kandinsky-decoder"}


@pytest.mark.parametrize("kind, module", [("msdm-unet", "harness.families.msdm.sampling"),
                                          ("kandinsky-prior", "harness.families.kandinsky22.train"),
                                          ("kandinsky-decoder", "harness.families.kandinsky22.train"),
                                          ("test-pattern", "harness.generate")])
def test_run_folders_from_before_the_move_find_their_generator(tmp_path, monkeypatch, kind, module):
    """A run's config.json names its kind as it did before the move; the registry maps it to the family folder."""
    from harness.families.registry import family_of, generator_loader

    assert generator_loader(kind).__module__ == module
    assert family_of(kind).name == {"msdm-unet": "msdm", "test-pattern": "test-pattern"}.get(kind, "kandinsky22")


def test_a_run_of_an_unknown_family_is_one_line_naming_the_generating_ones(tmp_path, monkeypatch):
    from harness.generate import load_generator
    from harness.runs import create_run

    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path))
    run = create_run("msdm-vae", {}, {})
    with pytest.raises(UserError, match="cannot generate images .*kandinsky-prior.*msdm-unet"):
        load_generator(run)


def test_grid_keys_resolve_to_config_fields_and_unknown_ones_name_the_allowed():
    from harness.families.kandinsky22.sweep import PRIOR
    from harness.families.kandinsky22.train import default_config
    from harness.sweep import cell_label, grid_cells, parse_grid, resolve_grid

    cfg = default_config("prior")
    axes = resolve_grid(PRIOR, cfg, parse_grid(["rank=2,3", "loop.lr=1e-4,2e-4", "lora-targets=paper",
                                                "snr_gamma=none,5", "dora=true"]))
    assert axes == {"lora.rank": [2, 3], "loop.lr": [1e-4, 2e-4], "lora.targets": ["paper"],
                    "snr_gamma": [None, 5], "lora.dora": [True]}
    cells = grid_cells({"lora.rank": [2, 3], "loop.lr": [1e-4, 2e-4]})
    assert [cell_label(c) for c in cells] == ["rank=2,lr=0.0001", "rank=2,lr=0.0002", "rank=3,lr=0.0001",
                                              "rank=3,lr=0.0002"]
    with pytest.raises(UserError, match=r"'nope' is not a training option of kandinsky-prior; allowed: .*\brank\b"):
        resolve_grid(PRIOR, cfg, {"nope": ["1"]})
    with pytest.raises(UserError, match="'seed' names several fields.*data.seed.*loop.seed"):
        resolve_grid(PRIOR, cfg, {"seed": ["1"]})
    with pytest.raises(UserError, match="'data_dir' is fixed"):
        resolve_grid(PRIOR, cfg, {"data_dir": ["x"]})
    with pytest.raises(UserError, match="not a number"):
        resolve_grid(PRIOR, cfg, {"rank": ["four"]})
    for bad in (["rank"], ["rank="], ["rank=1", "rank=2"]):
        with pytest.raises(UserError, match="--grid"):
            parse_grid(bad)


def test_sweep_cli_refuses_an_unknown_grid_key_in_one_line(run_cli):
    code, out, err = run_cli("sweep", "kandinsky-prior", "--grid", "rank=2,4", "--grid", "nope=1,2", "--print-config")
    assert code == 2 and "'nope' is not a training option of kandinsky-prior; allowed:" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, out, err = run_cli("sweep", "kandinsky-prior", "--ranks", "2", "--grid", "rank=4", "--print-config")
    assert code == 2 and "--ranks and --grid rank" in err
