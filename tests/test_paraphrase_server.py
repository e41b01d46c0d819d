"""`harness paraphrase` against a real HTTP server on 127.0.0.1 (tests/fake_openai_server.py), through the real
openai client: normal flow, 429 + retry-after, 5xx, hangs, malformed and short answers, unfaithful paraphrases,
SIGKILL mid-run then rerun, dry run, structured-output fallback, TRAIN-only split source, and the API key never
reaching any file or message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import (  # noqa: E402
    MALFORMED,
    FakeOpenAIServer,
    Reply,
    answer,
    completion,
    error_reply,
    faithful_paraphrase,
    good_reply,
    malformed_reply,
)

from harness.captions import attribute_differences  # noqa: E402
from harness.paraphrase import load_paraphrases, meta_path, paraphrases_sha256, read_records  # noqa: E402

KEY = "sk-test-Zq8w0r4nD0mK3y-4f1b2c3d4e5f"
REPO = Path(__file__).resolve().parents[1]

CAPTIONS = [
    "Generate an image with 2 polyps.",
    "Generate an image with an an abnormality located in the upper-left.",
    "Generate an image with no polyps.",
    "Generate an image from a colonoscopy procedure.",
    "Generate an image with a polyp of size < 5mm.",
    "Generate an image containing polyp snareandtube.",
]
# Fast fault handling for tests: tiny backoff, short timeout.
FAST = ["--backoff-base", "0.001", "--backoff-max", "0.01", "--timeout", "5", "--per-caption", "3"]


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def tiny_dev(tmp_path) -> Path:
    """Six real dev captions; the first appears on two images (it must still be sent once)."""
    d = tmp_path / "dev"
    (d / "images").mkdir(parents=True)
    rows = [f"{c};img{i}.jpg" for i, c in enumerate(CAPTIONS)] + [f"{CAPTIONS[0]};img9.jpg"]
    (d / "prompt-gt.csv").write_text("Prompt;Filename\n" + "\n".join(rows) + "\n")
    return d


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def paraphrase(run_cli, server, source, out, *extra):
    return run_cli("paraphrase", source, "--out", out, "--base-url", server.base_url, *FAST, *extra)


def assert_key_absent(root: Path, *texts: str) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), f"API key written to {p}"
    for t in texts:
        assert KEY not in t


# ---------------------------------------------------------------------------------------------------- normal flow


def test_normal_flow_sends_each_unique_caption_once_and_records_provenance(run_cli, server, sample_dir, tmp_path):
    from harness.data import load_devset

    def slow_good(req):  # hold each answer briefly so concurrent requests overlap on the server
        r = good_reply(req)
        r.delay = 0.2
        return r

    server.script = slow_good
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, sample_dir, out, "--captions-per-request", "8",
                                      "--concurrency", "3")
    assert code == 0, stderr
    unique = load_devset(sample_dir).unique_prompts()
    assert len(server.requests) == -(-len(unique) // 8)
    assert dict(server.caption_counts) == {c: 1 for c in unique}
    assert 2 <= server.max_in_flight <= 3  # concurrent, within the limit
    for req in server.requests:
        body = req.body
        assert req.headers["authorization"] == f"Bearer {KEY}"
        assert body["model"] == "gpt-3.5-turbo" and body["seed"] == 0
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["required"] == ["items"]
        assert all(isinstance(m["content"], str) for m in body["messages"])  # text only, never image parts
        assert "image_url" not in json.dumps(body)

    records = read_records(out)
    assert set(records) == set(unique)
    kept_all = set()
    for orig, rec in records.items():
        assert rec["returned"] == 3 and not rec["partial"] and rec["requests"] == 1
        assert len(rec["paraphrases"]) + len(rec["dropped"]) == 3
        assert rec["paraphrases"], orig
        for p in rec["paraphrases"]:
            assert attribute_differences(orig, p) == {}
        kept_all.update(rec["paraphrases"])
    assert f"unique prompts: {len(unique)} -> {len(unique) + len(kept_all)}" in stdout

    meta = json.loads(meta_path(out).read_text())
    assert meta["paraphrases_sha256"] == paraphrases_sha256(out)
    assert meta["source"]["csv_sha256"] == load_devset(sample_dir).csv_sha256
    assert meta["config"]["per_caption"] == 3 and meta["seed"] == 0 and len(meta["template"]["sha256"]) == 64
    assert meta["summary"]["requests"] == len(server.requests) and meta["summary"]["prompt_tokens"] > 0

    n = len(server.requests)
    code, stdout, _ = paraphrase(run_cli, server, sample_dir, out, "--captions-per-request", "8")
    assert code == 0 and len(server.requests) == n  # a rerun of a complete file sends nothing
    assert "0 captions sent" in stdout
    for extra in (["--model", "gpt-4o-mini"], ["--model", "gpt-4o-mini", "--dry-run"]):  # never mix two models
        code, _, stderr = paraphrase(run_cli, server, sample_dir, out, *extra)
        assert code == 2 and "holds results made with model gpt-3.5-turbo, not gpt-4o-mini" in stderr
    assert len(server.requests) == n


def test_split_source_sends_only_train_captions(run_cli, server, sample_dir, tmp_path):
    from harness.data import load_devset
    from harness.split import write_split

    split = write_split(sample_dir, tmp_path / "split.json", val_images=8)
    rows = load_devset(sample_dir).rows
    train = {r.prompt for r in rows if r.filename in set(split["train"])}
    val_only = {r.prompt for r in rows if r.filename in set(split["val"])} - train
    code, stdout, stderr = paraphrase(run_cli, server, tmp_path / "split.json", tmp_path / "p.jsonl",
                                      "--data", sample_dir, "--captions-per-request", "10")
    assert code == 0, stderr
    assert set(server.caption_counts) == train and not val_only & set(server.caption_counts)
    assert "TRAIN side" in stdout and f"{len(val_only)} validation-only captions are not sent" in stdout
    meta = json.loads(meta_path(tmp_path / "p.jsonl").read_text())
    assert meta["source"]["side"] == "train" and len(meta["source"]["split_sha256"]) == 64


# ---------------------------------------------------------------------------------------------------------- faults


def test_429_waits_for_retry_after(run_cli, server, tiny_dev, tmp_path):
    server.script = lambda req: (error_reply(429, "Rate limit reached", {"retry-after": "0.5"})
                                 if req.index == 0 else None)
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6", "--concurrency", "1")
    assert code == 0, stderr
    assert len(server.requests) == 2
    gap = server.requests[1].t - server.requests[0].t
    assert gap >= 0.5, gap  # the server's delay, not the 1 ms backoff
    assert len(load_paraphrases(out)) == len(CAPTIONS)
    assert json.loads(meta_path(out).read_text())["summary"]["retries"] == {"429": 1}


def test_5xx_is_retried_then_failures_are_reported_and_resent_on_rerun(run_cli, server, tiny_dev, tmp_path):
    flaky, dead = CAPTIONS[0], CAPTIONS[4]
    seen = {"flaky": 0}

    def script(req):
        if dead in req.captions:
            return error_reply(503, "overloaded")
        if flaky in req.captions and seen["flaky"] < 2:
            seen["flaky"] += 1
            return error_reply(500, "internal error")
        return None

    server.script = script
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "2",
                                      "--max-retries", "2")
    assert code == 2
    assert "2 captions failed after all retries" in stderr and "503 after 3 attempts" in stderr
    assert server.caption_counts[dead] == 3 and server.caption_counts[flaky] == 3  # 1 + 2 retries each
    done = read_records(out)
    assert set(done) == set(CAPTIONS) - set(CAPTIONS[4:6])  # the dead batch (captions 5, 6) has no record
    assert "2 failed this run" in stdout

    server.script = None
    before = len(server.requests)
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "2")
    assert code == 0, stderr
    assert [r.captions for r in server.requests[before:]] == [CAPTIONS[4:6]]  # only what was missing
    assert len(load_paraphrases(out)) == len(CAPTIONS)


def test_a_hang_longer_than_the_timeout_is_retried(run_cli, server, tiny_dev, tmp_path):
    # 1 s client timeout against a 4 s hang: margin enough that the immediate retry never times out on a busy box.
    server.script = lambda req: Reply(body=completion("{}"), delay=4.0) if req.index == 0 else None
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6", "--timeout", "1")
    assert code == 0, stderr
    assert 1.0 <= server.requests[1].t - server.requests[0].t < 3.5  # gave up at the timeout, not at the answer
    # Normally 2 requests; a CPU stall > 1 s on a loaded box may time out the retry too, which is still correct.
    retries = json.loads(meta_path(out).read_text())["summary"]["retries"]
    assert retries == {"timeout": len(server.requests) - 1} and len(server.requests) >= 2
    assert len(load_paraphrases(out)) == len(CAPTIONS)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_200_answer_is_a_failure_never_a_cached_result(run_cli, server, tiny_dev, tmp_path, kind):
    """HTML, no choices, empty or non-text content, wrong types, prose, truncated JSON: each is retried per the
    policy, then the caption is reported failed (exit 2, one line), has no record, and a rerun sends exactly it."""
    bad = CAPTIONS[2]
    server.script = lambda req: malformed_reply(kind) if bad in req.captions else None
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "1",
                                      "--max-retries", "2")
    assert code == 2, (stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and "1 caption failed after all retries" in stderr, stderr
    assert "malformed answer after 3 attempts" in stderr
    assert server.caption_counts[bad] == 3  # 1 + 2 retries, the policy's count
    recs = read_records(out)
    assert set(recs) == set(CAPTIONS) - {bad} and not any(r["partial"] for r in recs.values())
    summary = json.loads(meta_path(out).read_text())["summary"]
    assert summary["failed"] == 1 and summary["retries"] == {"malformed": 2} and summary["captions_done"] == 5

    server.script = None
    before = len(server.requests)
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "1")
    assert code == 0, stderr
    assert [r.captions for r in server.requests[before:]] == [[bad]]  # exactly the failed caption
    assert len(load_paraphrases(out)[bad]) == 3


def test_a_malformed_answer_then_a_good_one_is_a_full_result(run_cli, server, tiny_dev, tmp_path):
    once = CAPTIONS[1]
    seen = {"n": 0}

    def script(req):
        if once in req.captions and seen["n"] < 2:
            seen["n"] += 1
            return malformed_reply(("html", "no_choices")[seen["n"] - 1])
        return None

    server.script = script
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "1")
    assert code == 0, stderr
    rec = read_records(out)[once]
    assert not rec["partial"] and len(rec["paraphrases"]) == 3 and server.caption_counts[once] == 3
    assert json.loads(meta_path(out).read_text())["summary"]["retries"] == {"malformed": 2}


def test_a_caption_the_answers_leave_out_fails_the_others_are_kept(run_cli, server, tiny_dev, tmp_path):
    skipped = CAPTIONS[2]  # third of the first batch of three: never answered, not even when asked alone

    def script(req):
        return answer([(i, [faithful_paraphrase(c, k) for k in range(3)])
                       for i, c in enumerate(req.captions, 1) if c != skipped])

    server.script = script
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "3",
                                      "--concurrency", "1", "--max-retries", "1")
    assert code == 2 and "1 caption failed" in stderr and "no paraphrase text" in stderr, stderr
    assert set(read_records(out)) == set(CAPTIONS) - {skipped}
    assert server.caption_counts[skipped] == 3  # in its batch, then alone (1 + 1 retry)
    assert "1 failed this run" in stdout


def test_empty_records_of_an_older_cache_are_sent_again(run_cli, server, tiny_dev, tmp_path):
    """Caches written when an HTML answer became a partial record of nothing: such records are not results."""
    out = tmp_path / "p.jsonl"
    assert paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6")[0] == 0
    poisoned = dict(read_records(out)[CAPTIONS[3]], paraphrases=[], dropped=[], returned=0, partial=True,
                    note="empty answer")
    with out.open("a") as f:
        f.write(json.dumps(poisoned) + "\n")
    before = len(server.requests)
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6")
    assert code == 0, stderr
    assert [r.captions for r in server.requests[before:]] == [[CAPTIONS[3]]]
    assert len(load_paraphrases(out)[CAPTIONS[3]]) == 3


def test_too_few_paraphrases_asks_again_for_those_captions_only(run_cli, server, tiny_dev, tmp_path):
    short = CAPTIONS[3]

    def script(req):
        n = [1 if c == short else 3 for c in req.captions]
        return answer([(i, [faithful_paraphrase(c, k) for k in range(n[i - 1])])
                       for i, c in enumerate(req.captions, 1)])

    server.script = script
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6")
    assert code == 0, stderr
    assert len(server.requests) == 2 and server.requests[1].captions == [short]
    rec = read_records(out)[short]
    assert rec["partial"] and rec["note"] == "returned 2 of 3" and rec["returned"] == 2
    assert rec["paraphrases"] == [faithful_paraphrase(short, 0)]  # the same one twice: one kept, one duplicate
    assert [d["reason"] for d in rec["dropped"]] == ["duplicate"]


def test_paraphrases_that_change_a_number_or_location_are_dropped(run_cli, server, tiny_dev, tmp_path):
    wrong = {CAPTIONS[0]: "Create a picture with 3 polyps.",
             CAPTIONS[1]: "Show an abnormality located in the lower-right.",
             CAPTIONS[2]: "Create a picture with some polyps.",
             CAPTIONS[3]: "Produce a frame captured during a colonoscopy, showing bleeding."}

    def script(req):
        return answer([(i, ([wrong[c]] if c in wrong else []) + [faithful_paraphrase(c, k) for k in range(2)])
                       for i, c in enumerate(req.captions, 1)])

    server.script = script
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "3")
    assert code == 0, stderr
    recs = read_records(out)
    for orig, bad in wrong.items():
        assert bad not in recs[orig]["paraphrases"] and len(recs[orig]["paraphrases"]) == 2
        (d,) = recs[orig]["dropped"]
        assert d["text"] == bad and d["reason"] == "attributes_changed"
    assert recs[CAPTIONS[0]]["dropped"][0]["detail"] == "numbers -2 +3"
    assert recs[CAPTIONS[1]]["dropped"][0]["detail"] == "locations -upper-left +lower-right"
    assert recs[CAPTIONS[3]]["dropped"][0]["detail"] == "unknown_terms +bleeding"
    assert "attributes_changed 4" in stdout and "locations 1" in stdout and "numbers 1" in stdout
    assert "unknown_terms 1" in stdout


def test_structured_output_steps_down_when_the_server_refuses_json_schema(run_cli, server, tiny_dev, tmp_path):
    def script(req):
        if req.body.get("response_format", {}).get("type") == "json_schema":
            return error_reply(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                                    "with this model.", param="response_format")
        return None

    server.script = script
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "3",
                                      "--concurrency", "1")
    assert code == 0, stderr
    assert [r.body.get("response_format", {}).get("type") for r in server.requests] == \
        ["json_schema", "json_object", "json_object"]
    assert {r["response_format"] for r in read_records(out).values()} == {"json_object"}
    assert "json_schema->json_object" in stdout


# ------------------------------------------------------------------------------------------- kill, key, dry run


def test_sigkill_mid_run_then_rerun_loses_nothing_and_resends_only_the_missing(run_cli, server, tiny_dev, tmp_path):
    hold = threading.Event()
    server.script = lambda req: Reply(hold=hold) if req.index == 3 else None  # 4th request hangs on the server
    out = tmp_path / "p.jsonl"
    env = dict(os.environ, OPENAI_API_KEY=KEY, HARNESS_NO_PROGRESS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "paraphrase", str(tiny_dev), "--out", str(out), "--base-url",
         server.base_url, *FAST, "--captions-per-request", "1", "--concurrency", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        server.wait_for_requests(4, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    lines = out.read_bytes().splitlines(keepends=True)
    assert [json.loads(l)["original"] for l in lines] == CAPTIONS[:3]  # answered captions are all on disk, whole

    # A kill can also land inside the write of a line: cut the last one in half. Its caption must be asked again.
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    hold.set()
    server.script = None
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "1",
                                      "--concurrency", "1")
    assert code == 0, stderr
    assert "torn line" in stdout
    counts = server.caption_counts
    assert [counts[c] for c in CAPTIONS] == [1, 1, 2, 2, 1, 1]  # only the torn one and the in-flight one twice
    result = load_paraphrases(out)
    assert set(result) == set(CAPTIONS) and all(len(v) == 3 for v in result.values())
    assert len(out.read_text().splitlines()) == len(CAPTIONS)
    assert_key_absent(tmp_path, stdout, stderr)


def test_ctrl_c_stops_at_once_and_keeps_every_answered_caption(server, tiny_dev, tmp_path):
    hold = threading.Event()
    server.script = lambda req: Reply(hold=hold) if req.index == 2 else None
    out = tmp_path / "p.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "paraphrase", str(tiny_dev), "--out", str(out), "--base-url",
         server.base_url, *FAST, "--captions-per-request", "1", "--concurrency", "1"],
        env=dict(os.environ, OPENAI_API_KEY=KEY, HARNESS_NO_PROGRESS="1"), cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        server.wait_for_requests(3, timeout=60)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)  # the held request is abandoned, not waited for
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "run the same command again" in stderr
    assert list(read_records(out)) == CAPTIONS[:2]
    assert json.loads(meta_path(out).read_text())["summary"]["captions_done"] == 2


def test_api_key_never_in_files_logs_or_errors(run_cli, server, tiny_dev, tmp_path):
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "3")
    assert code == 0 and server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was really used
    # A server that echoes the key in its 401 (OpenAI does, partly masked; some proxies in full).
    server.script = lambda req: error_reply(401, f"Incorrect API key provided: {KEY}.", code="invalid_api_key")
    out2 = tmp_path / "q.jsonl"
    code2, stdout2, stderr2 = paraphrase(run_cli, server, tiny_dev, out2, "--captions-per-request", "3")
    assert code2 == 2
    assert "API error 401 (check OPENAI_API_KEY)" in stderr2 and "***" in stderr2
    assert len(stderr2.strip().splitlines()) == 1
    code3, stdout3, stderr3 = run_cli("--verbose", "paraphrase", tiny_dev, "--out", out2, "--base-url",
                                      server.base_url, *FAST)
    assert code3 == 2
    assert_key_absent(tmp_path, stdout, stderr, stdout2, stderr2, stdout3, stderr3)


def test_unknown_model_is_fatal_but_keeps_what_was_answered(run_cli, server, tiny_dev, tmp_path):
    server.script = lambda req: (error_reply(404, "The model `gpt-9` does not exist", code="model_not_found")
                                 if req.index >= 1 else None)
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "2", "--concurrency", "1",
                                 "--model", "gpt-9")
    assert code == 2 and "unknown model 'gpt-9'" in stderr
    assert set(read_records(out)) == set(CAPTIONS[:2]) and meta_path(out).is_file()
    assert len(server.requests) == 2  # a 404 is not retried


def test_dry_run_sends_nothing_and_writes_nothing(run_cli, server, tiny_dev, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "4", "--dry-run")
    assert code == 0, stderr
    assert server.requests == [] and not out.exists() and not meta_path(out).exists()
    assert "6 to send in 2 requests" in stdout
    assert "estimated tokens:" in stdout and "estimated cost $" in stdout and "prices as of 2025-06" in stdout
    assert CAPTIONS[0] in stdout and "--- user ---" in stdout  # shows what would be sent
    assert "OPENAI_API_KEY is not set" in stdout

    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out)
    assert code == 2 and "OPENAI_API_KEY is not set" in stderr and server.requests == []


@pytest.mark.parametrize("option,value,says", [
    ("--per-caption", "0", "0 is not in the range x>=1"),
    ("--captions-per-request", "-2", "not in the range x>=1"),
    ("--output-token-budget", "0", "not in the range x>=1"),
    ("--concurrency", "0", "not in the range x>=1"),
    ("--max-words", "0", "not in the range x>=1"),
    ("--max-retries", "-1", "not in the range x>=0"),
    ("--temperature", "nan", "not a finite number"),
    ("--temperature", "2.5", "not in the range 0.0<=x<=2.0"),
    ("--timeout", "0", "not in the range x>0.0"),
    ("--timeout", "inf", "not a finite number"),
    ("--backoff-base", "-1", "not in the range x>=0.0"),
    ("--backoff-max", "nan", "not a finite number"),
    ("--near-duplicate", "1.5", "not in the range 0.0<x<=1.0"),
    ("--seed", "-1", "not in the range 0<=x<=4294967295"),
    ("--concurrency", "four", "'four' is not a valid integer"),
])
def test_bad_numeric_options_are_one_line_and_exit_2(run_cli, server, tiny_dev, tmp_path, option, value, says):
    code, stdout, stderr = run_cli("paraphrase", tiny_dev, "--out", tmp_path / "p.jsonl", "--base-url",
                                   server.base_url, option, value)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [stderr.strip()] and option in stderr and says in stderr, stderr
    assert server.requests == [] and not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("key,value", [("temperature", "NaN"), ("timeout", "Infinity"), ("per_caption", "2.5"),
                                       ("seed", "-3"), ("concurrency", "true")])
def test_bad_numbers_in_a_config_file_are_one_line_and_exit_2(run_cli, server, tiny_dev, tmp_path, key, value):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(f'{{"{key}": {value}}}')  # Python's json reads NaN and Infinity
    code, _, stderr = run_cli("paraphrase", tiny_dev, "--out", tmp_path / "p.jsonl", "--base-url", server.base_url,
                              "--config", cfg)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and key in stderr, stderr
    assert server.requests == []


def test_usage_mistakes_are_one_line_too(run_cli):
    for args, says in ((["paraphrase"], "Missing argument"), (["paraphrase", ".", "--bogus"], "No such option")):
        code, _, stderr = run_cli(*args)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and says in stderr, stderr


def test_help_has_an_example(run_cli):
    code, stdout, _ = run_cli("paraphrase", "--help")
    assert code == 0 and "Examples:" in stdout and "--per-caption" in stdout and "--dry-run" in stdout


@pytest.mark.slow
def test_full_dev_set_end_to_end(run_cli, server, dev_dir, tmp_path):
    """All 483 unique dev captions with the default settings (25 per caption, token-budgeted batches)."""
    from harness.data import load_devset
    from harness.paraphrase import ParaphraseConfig, make_batches

    unique = load_devset(dev_dir).unique_prompts()
    out = tmp_path / "p.jsonl"
    code, stdout, stderr = run_cli("paraphrase", dev_dir, "--out", out, "--base-url", server.base_url)
    assert code == 0, stderr
    assert dict(server.caption_counts) == {c: 1 for c in unique}
    assert sorted(r.captions for r in server.requests) == sorted(make_batches(unique, ParaphraseConfig()))
    recs = read_records(out)
    assert set(recs) == set(unique) and all(r["returned"] == 25 for r in recs.values())
    for orig, rec in recs.items():
        assert len(rec["paraphrases"]) >= len({faithful_paraphrase(orig, k) for k in range(5)}) - 1
        assert all(attribute_differences(orig, p) == {} for p in rec["paraphrases"])


def test_a_failed_re_ask_keeps_the_first_answer_as_partial(run_cli, server, tiny_dev, tmp_path):
    def script(req):
        if req.index == 0:  # 1 of 3 for every caption: all of them are asked again ...
            return good_reply(req, n=1)
        return error_reply(500, "down")  # ... and the re-ask never gets through

    server.script = script
    out = tmp_path / "p.jsonl"
    code, _, stderr = paraphrase(run_cli, server, tiny_dev, out, "--captions-per-request", "6", "--max-retries", "1")
    assert code == 0, stderr
    recs = read_records(out)
    assert set(recs) == set(CAPTIONS) and len(server.requests) == 3
    for c, rec in recs.items():
        assert rec["partial"] and rec["paraphrases"] == [faithful_paraphrase(c, 0)]
        assert rec["note"] == "returned 1 of 3; re-ask failed: 500 after 2 attempts"
