"""Any-axis sweeps (`harness sweep KIND --grid key=v1,v2 --grid key2=a,b`): the cartesian product of two options,
each cell trained -> generated -> recorded; a SIGKILLed training is continued in its own run by the rerun; the
summary table and plot are per cell label."""

from __future__ import annotations

import json

import pytest
from pathlib import Path

from test_kandinsky_fixtures import _one_torch_thread, mini_data, tiny_config, tiny_kandinsky  # noqa: F401 (fixtures)


def _grid_args(tiny_kandinsky, mini_data, tmp_path, *extra) -> list[str]:
    return ["sweep", "kandinsky-prior", "--split", str(mini_data[1]), "--data", str(mini_data[0]),
            "--prior", str(tiny_kandinsky[0]), "--decoder", str(tiny_kandinsky[1]),
            "--grid", "rank=2,3", "--grid", "lr=1e-3,2e-3",
            "--batch-size", "2", "--resolution", "32", "--n-prompts", "1", "--images-per-prompt", "1", "--no-score",
            "--prior-steps", "2", "--decoder-steps", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
            "--sweep-dir", str(tmp_path / "sw"), *extra]


def test_two_by_two_grid_runs_end_to_end_and_resumes_a_sigkilled_cell(tiny_kandinsky, mini_data, tmp_path, run_cli):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    args = _grid_args(tiny_kandinsky, mini_data, tmp_path, "--max-steps", "8", "--checkpoint-every", "1",
                      "--keep-last", "2")
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HARNESS_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec_path = tmp_path / "sw" / "sweep.json"
    first = "rank=2,lr=0.001"
    run_dir = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if rec_path.is_file():
                run_ref = json.loads(rec_path.read_text()).get("cells", {}).get(first, {}).get("run")
                if run_ref and list(Path(run_ref).glob("checkpoints/step-*/trainer_state.json")):
                    run_dir = Path(run_ref)
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert run_dir is not None, err.decode()[-2000:]
    assert not (run_dir / "final").exists()  # killed mid-training
    killed_at = max(int(p.name[5:]) for p in run_dir.glob("checkpoints/step-*") if (p / "trainer_state.json").is_file())

    code, out, err = run_cli(*args)
    assert code == 0, err
    rec = json.loads(rec_path.read_text())
    labels = ["rank=2,lr=0.001", "rank=2,lr=0.002", "rank=3,lr=0.001", "rank=3,lr=0.002"]
    assert list(rec["cells"]) == labels and rec["axes"] == ["lora.rank", "loop.lr"]
    assert rec["base_config"]["lora"]["rank"] is None and rec["base_config"]["loop"]["lr"] is None
    for label, cell in rec["cells"].items():
        assert cell["status"] == "done" and cell["n_images"] == 1, (label, cell)
        cfg = json.loads((Path(cell["run"]) / "config.json").read_text())
        assert (cfg["lora"]["rank"], cfg["loop"]["lr"]) == (cell["params"]["lora.rank"], cell["params"]["loop.lr"])
        assert cell["trainable"] == 327_680 * cell["params"]["lora.rank"]  # the real prior's count
    # the killed cell was continued in the run dir recorded before training, not restarted
    assert Path(rec["cells"][first]["run"]) == run_dir
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert stats["start_step"] >= killed_at and stats["steps"] == 8
    runs = sorted(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("kandinsky-prior"))
    assert len(runs) == 4  # one run per cell, none started twice
    # every cell generated the same prompt with the same seed
    import csv

    rows = {tuple((r["prompt"], r["seed"]) for r in csv.DictReader(
        (Path(c["run"]) / "images" / "manifest.csv").open(encoding="utf-8"))) for c in rec["cells"].values()}
    assert len(rows) == 1
    assert "rank=3,lr=0.002" in out and "done" in out

    code, out, err = run_cli(*args)  # rerun: every cell done, nothing trains
    assert code == 0 and (out + err).count("skipped") == 4
    assert len([d for d in (tmp_path / "runs").iterdir() if d.name.startswith("kandinsky-prior")]) == 4


def test_grid_sweep_intervals_marks_and_plot_per_cell(tiny_kandinsky, mini_data, tmp_path, monkeypatch):
    """A crash in one cell is recorded and the others go on; intervals and the indistinguishable-from-best marks
    come per cell label, and the plot has one point per cell (synthetic features: scoring needs Inception)."""
    import numpy as np

    import harness.families.kandinsky22.train as tk
    import harness.score as score_mod
    import harness.sweep as sweep
    from harness.runs import open_run

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    shift = {(2, False): 0.0, (2, True): 0.02, (3, False): 1.0}
    gen = {k: rng.normal(size=(300, 8)) for k in shift}

    def features(run):
        c = open_run(run.dir).config()
        k = (c["lora"]["rank"], c["lora"]["dora"])
        return {"fid": (gen[k] + shift[k], real), "prc": (gen[k] + shift[k], real)}

    class FakeResult:
        def __init__(self, run):
            self.path = run.dir / "metrics.json"

        def summary_line(self):
            return "scored"

    real_train = tk.train

    def flaky_train(c, *a, **k):
        if (c.lora.rank, c.lora.dora) == (3, True):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_train(c, *a, **k)

    monkeypatch.setattr(tk, "train", flaky_train)
    monkeypatch.setattr(score_mod, "score_run", lambda run, cfg=None, **k: FakeResult(run))
    monkeypatch.setattr(sweep, "rank_features", features)
    monkeypatch.setattr(sweep, "N_BOOT", 50)
    cfg = tiny_config("prior", tiny_kandinsky, mini_data, tmp_path, loop={"max_steps": 1})
    res = sweep.run_sweep(cfg, {"rank": [2, 3], "dora": [False, True]}, sweep_dir=tmp_path / "sw", n_prompts=1,
                          gen_batch_size=2, device="cpu", images_per_prompt=1)
    rec = res.record
    assert res.failed() == ["rank=3,dora=true"] and "simulated" in rec["cells"]["rank=3,dora=true"]["error"]
    assert rec["best"] in ("rank=2,dora=false", "rank=2,dora=true")
    other = "rank=2,dora=true" if rec["best"] == "rank=2,dora=false" else "rank=2,dora=false"
    assert rec["cells"][other]["vs_best"]["indistinguishable"] is True
    assert rec["cells"]["rank=3,dora=false"]["vs_best"]["indistinguishable"] is False
    assert (tmp_path / "sw" / "sweep.png").is_file() and rec["plot"].endswith("sweep.png")
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(res.table())
    text = console.export_text()
    assert "best cell" in text and "rank=3,dora=false" in text and "≈" in text and "worse" in text


def test_msdm_unet_grid_sweep_from_the_cli(tmp_path, monkeypatch, run_cli):
    """The generic sweep command a family gets from its train command (harness.cli.common.sweep_command): every
    training option is a sweep option, the grid keys are config fields, a rerun skips the finished cells."""
    from harness.data import load_devset
    from harness.families.msdm.config import vae_config
    from harness.families.msdm.train import train
    from harness.io import write_json
    from harness.sample import sample_dir
    from harness.split import make_split
    from models.tiny_clip import save_tiny_clip_text

    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    data = sample_dir()
    split = make_split(data, val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(tmp_path / "split.json", split)
    clip = save_tiny_clip_text(tmp_path / "clip", load_devset(data).unique_prompts())
    loop = {"batch_size": 4, "checkpoint_every": 0, "val_every": 0, "sample_every": 0, "max_steps": 2}
    vae = train(vae_config("tiny", data, tmp_path / "split.json", {
        "data": {"jitter": 0.0, "resolution": 32}, "loss": {"perceptual_weight": 0.0}, "loop": loop}))
    args = ["sweep", "msdm-unet", "--split", tmp_path / "split.json", "--data", data, "--vae", vae.dir,
            "--text-encoder", clip, "--jitter", "0", "--max-steps", "2", "--batch-size", "4", "--steps", "2",
            "--grid", "lr=1e-3,2e-3", "--grid", "ema_decay=0,0.9", "--n-prompts", "1", "--images-per-prompt", "1",
            "--no-score", "--device", "cpu", "--sweep-dir", tmp_path / "sw"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    rec = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert rec["family"] == "msdm-unet" and rec["axes"] == ["loop.lr", "ema_decay"]
    assert list(rec["cells"]) == ["lr=0.001,ema_decay=0", "lr=0.001,ema_decay=0.9", "lr=0.002,ema_decay=0",
                                  "lr=0.002,ema_decay=0.9"]
    for cell in rec["cells"].values():
        cfg = json.loads((Path(cell["run"]) / "config.json").read_text())
        assert cell["status"] == "done" and cell["n_images"] == 1
        assert (cfg["loop"]["lr"], cfg["ema_decay"]) == (cell["params"]["loop.lr"], cell["params"]["ema_decay"])
    code, out, err = run_cli(*args)
    assert code == 0 and (out + err).count("skipped") == 4
    bad = list(args)
    bad[bad.index("ema_decay=0,0.9")] = "nope=1"
    code, out, err = run_cli(*bad)
    assert code == 2 and "'nope' is not a training option of msdm-unet; allowed:" in err and "ema_decay" in err
    # --print-config: the base every cell starts from, the resolved grid and the cells; nothing trained
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    code, out, err = run_cli(*args, "--print-config")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["loop"]["lr"] is None and shown["ema_decay"] is None  # set per cell
    assert shown["sweep"]["cells"] == list(rec["cells"]) and shown["sweep"]["generation"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before



@pytest.fixture(scope="module")
def tiny_vae_run(tmp_path_factory):
    from harness.families.msdm.config import vae_config
    from harness.families.msdm.train import train
    from harness.io import write_json
    from harness.sample import sample_dir
    from harness.split import make_split

    d = tmp_path_factory.mktemp("vae")
    data = sample_dir()
    split = make_split(data, val_images=4, seed=0)
    split["train"] = split["train"][:8]
    write_json(d / "split.json", split)
    mp = pytest.MonkeyPatch()
    mp.setenv("HARNESS_RUNS_DIR", str(d / "runs"))
    try:
        vae = train(vae_config("tiny", data, d / "split.json", {
            "data": {"jitter": 0.0, "resolution": 32}, "loss": {"perceptual_weight": 0.0},
            "loop": {"batch_size": 4, "checkpoint_every": 0, "val_every": 0, "sample_every": 0, "max_steps": 1}}))
    finally:
        mp.undo()
    return data, d / "split.json", vae.dir


@pytest.mark.parametrize("bad", [["--device", "bogus"], ["--device", "cuda:99"], ["--grid", "loop.seed=-1"],
                                 ["--sweep-dir", "/proc/harness-no/sw"]])
def test_sweep_bad_inputs_fail_before_any_cell_trains(tmp_path, monkeypatch, run_cli, tiny_vae_run, bad):
    """A bad --device used to surface only at generation, after the first cell had trained (a recorded failure per
    cell), and a grid seed outside the RNG's range trained; now one line, exit 2, before anything trains."""
    import harness.families.msdm.train as mt

    data, split, vae = tiny_vae_run
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))

    def no_training(*a, **k):
        raise AssertionError("a cell trained despite a bad option")

    monkeypatch.setattr(mt, "train", no_training)
    code, out, err = run_cli("sweep", "msdm-unet", "--split", split, "--data", data, "--vae", vae,
                             "--max-steps", "1", "--grid", "lr=1e-3", "--no-score", *bad)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
