"""Paraphrase expansion without a server: template, screening of realistic paraphrases, answer parsing, the cache
file (torn lines, compatibility), the trainers' reader and hash, sources (dev set / TRAIN side of a split)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from harness.errors import UserError
from harness.paraphrase import (
    ParaphraseCache,
    ParaphraseConfig,
    collect_captions,
    load_paraphrases,
    load_template,
    make_plan,
    normalise,
    paraphrases_sha256,
    parse_answer,
    price_for,
    read_records,
    screen,
)
from harness.paraphrase_client import redact, retry_after_seconds, safe_url

CFG = ParaphraseConfig(per_caption=5)

# (original dev caption, paraphrases a chat model plausibly writes that keep every attribute)
FAITHFUL = [
    ("Generate an image with 2 polyps.",
     ["Create an endoscopic picture showing two polyps.", "Produce an endoscopic view in which 2 polyps are visible."]),
    ("Generate an image with an an abnormality located in the upper-left.",
     ["Show an abnormality in the top left corner of the frame.", "An abnormality should appear upper-left."]),
    ("Generate an image with a polyp of size < 5mm.",
     ["Depict a polyp smaller than 5 mm.", "Show a polyp measuring less than 5mm."]),
    ("Generate an image with polyps of size 5-10mm and 11-20mm.",
     ["Show polyps measuring 5 to 10 mm and 11 to 20 mm."]),
    ("Generate an image with no polyps.",
     ["Produce an endoscopic image free of polyps.", "Create a frame without any polyps."]),
    ("Generate an image not containing text.",
     ["Create an image without any text overlay.", "Make a picture that has no writing on it."]),
    ("Generate an image containing polyp snareandtube.",
     ["Show a polyp snare and a tube in the field of view."]),
    ("Generate an image from a colonoscopy procedure.",
     ["Produce a frame captured during a colonoscopy.", "An image taken in a colonoscopic examination."]),
    ("Generate an image with an abnormality with the colors pink and red.",
     ["Create an image of a pink and red abnormality.", "Show an abnormal area coloured red and pink."]),
    ("Generate an image with an an anatomical landmark located in the center and lower-rigth.",
     ["Show an anatomical landmark in the centre and the lower right."]),
    ("Generate a polyp of type paris iia.", ["Render a Paris IIa polyp."]),
]

# (original, unfaithful paraphrase, the attribute whose change must be detected)
UNFAITHFUL = [
    ("Generate an image with 2 polyps.", "Create a picture showing three polyps.", "numbers"),
    ("Generate an image with 1 finding.", "Show an image with 2 findings.", "numbers"),
    ("Generate an image with an an abnormality located in the upper-left.",
     "Show an abnormality in the lower left corner.", "locations"),
    ("Generate an image with an an instrument located in the center-right.",
     "Show an instrument on the left side, in the center-left.", "locations"),
    ("Generate an image with a polyp of size < 5mm.", "Depict a polyp larger than 20 mm.", "sizes"),
    ("Generate an image with no polyps.", "Produce an image showing polyps.", "negations"),
    ("Generate an image from a colonoscopy procedure.", "An image taken during a gastroscopy.", "procedure"),
    ("Generate an image containing a metal clip.", "Show biopsy forceps in the image.", "instruments"),
    ("Generate an image with an abnormality with the color pink.", "Create an image of a red abnormality.", "colours"),
    ("Generate a polyp of type paris iia.", "Render a Paris IIb polyp.", "paris"),
    # the Paris class implies the polyp; the swapped-in finding is outside the vocabulary
    ("Generate a polyp of type paris is.", "Generate a ulcer of type paris is.", "unknown_terms"),
    ("Generate a polyp of type paris is.", "Generate an oesophagitis of type paris is.", "findings"),
    ("Generate a polyp of type paris is.", "Generate a polyp of type paris is and bleeding.", "unknown_terms"),
    ("Generate an image with no polyps.", "Generate an image with no polyps and oesophagitis.", "negations"),
    # an organ, a morphology, a vague size: commitments the original does not make
    ("Generate an image with 2 polyps.", "Show two polyps in the colon.", "unknown_terms"),
    ("Generate an image with 2 polyps.", "Show two sessile polyps.", "unknown_terms"),
]


def test_faithful_paraphrases_are_kept():
    for original, paras in FAITHFUL:
        kept, dropped = screen(original, paras, CFG)
        assert kept == paras, (original, dropped)


@pytest.mark.parametrize("original,bad,attr", UNFAITHFUL)
def test_changed_attribute_is_dropped_with_the_attribute_named(original, bad, attr):
    good = FAITHFUL[0][1][0] if original == FAITHFUL[0][0] else None
    kept, dropped = screen(original, [bad] + ([good] if good else []), CFG)
    assert bad not in kept
    assert dropped[0]["reason"] == "attributes_changed"
    assert dropped[0]["detail"].startswith(attr) or f"; {attr}" in dropped[0]["detail"], dropped[0]["detail"]
    if good:
        assert kept == [good]  # one bad paraphrase does not take the good ones down with it


def test_duplicates_near_duplicates_and_junk_are_dropped_by_reason():
    original = "Generate an image with 2 polyps."
    raw = [
        "Create an endoscopic picture showing two polyps.",
        "Create an endoscopic picture showing two polyps.",  # exact duplicate
        "create an endoscopic picture, showing two polyps!",  # same after normalisation
        "Create the endoscopic picture showing two polyp.",  # near duplicate (ratio >= 0.9)
        "Generate an image with 2 polyps",  # the original without its full stop
        "   ",
        17,
        " ".join(["Create"] + ["very"] * 70 + ["detailed image with 2 polyps."]),
    ]
    kept, dropped = screen(original, raw, CFG)
    assert kept == ["Create an endoscopic picture showing two polyps."]
    assert [d["reason"] for d in dropped] == ["duplicate", "near_duplicate", "near_duplicate", "same_as_original",
                                              "empty", "not_text", "too_long"]


def test_surplus_beyond_per_caption_is_dropped_and_whitespace_normalised():
    original = "Generate an image with no polyps."
    raw = ["Produce an endoscopic image free of polyps.", "Create a frame   without\nany polyps.",
           "Render an endoscopy view that has no polyps at all."]
    kept, dropped = screen(original, raw, ParaphraseConfig(per_caption=2))
    assert kept == ["Produce an endoscopic image free of polyps.", "Create a frame without any polyps."]
    assert [d["reason"] for d in dropped] == ["surplus"]


def test_normalise_keeps_size_signs_and_drops_articles():
    assert normalise("A polyp of size < 5mm!") == "polyp of size < 5mm"
    assert normalise("The  Z-line, upper-left.") == "z-line upper-left"


@pytest.mark.parametrize("content,problem", [
    (None, "empty answer"),
    ("{not json", "malformed JSON"),
    ('{"items": 3}', "malformed answer: no 'items' list"),
    ('{"items": [{"id": 9, "paraphrases": ["x"]}]}', "malformed answer: no usable items"),
])
def test_parse_answer_reports_unusable_answers(content, problem):
    answer, why = parse_answer(content, "stop", 2)
    assert answer == {} and why == problem


def test_parse_answer_tolerates_fences_prose_string_ids_and_notes_truncation():
    body = {"items": [{"id": "1", "paraphrases": ["a", "b"]}, {"id": 2, "paraphrases": ["c"]},
                      {"id": 2, "paraphrases": ["dup"]}]}
    assert parse_answer("```json\n" + json.dumps(body) + "\n```", "stop", 2) == ({1: ["a", "b"], 2: ["c"]}, None)
    assert parse_answer("Sure! " + json.dumps(body) + " Hope this helps.", "stop", 2)[0] == {1: ["a", "b"], 2: ["c"]}
    assert parse_answer('{"items": [{"id": 1, "paraphrases": ["a", "b', "length", 1) == \
        ({}, "malformed JSON (cut off: finish_reason=length)")


def test_template_renders_captions_as_json_and_hash_is_of_the_file(tmp_path):
    t = load_template()
    assert t.path.name == "paraphrase.md" and len(t.sha256) == 64
    msgs = t.messages(['Generate an image with 2 polyps.', 'Say "hi"'], 7)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Write 7 paraphrases" in msgs[1]["content"]
    assert '{"id": 2, "caption": "Say \\"hi\\""}' in msgs[1]["content"]
    assert "<!--" not in msgs[0]["content"] + msgs[1]["content"]  # editor notes are not sent
    custom = tmp_path / "t.md"
    custom.write_text("## user\nGive {{per_caption}} for:\n{{captions}}\n")
    t2 = load_template(custom)
    assert t2.system == "" and t2.sha256 != t.sha256


@pytest.mark.parametrize("text,msg", [
    ("no sections at all {{captions}} {{per_caption}}", "needs a '## user' section"),
    ("## user\nonly {{captions}}\n", "never uses the placeholder {{per_caption}}"),
    ("## system\n{{captions}}\n## user\n{{per_caption}}\n", "must be in the '## user' section"),
    ("## user\n{{captions}} {{per_caption}}\n## user\nagain\n", "two '## user' sections"),
])
def test_bad_templates_are_user_errors_naming_the_file(tmp_path, text, msg):
    p = tmp_path / "bad.md"
    p.write_text(text)
    with pytest.raises(UserError, match=msg) as e:
        load_template(p)
    assert str(p) in str(e.value)


def _record(original, paras, **kw):
    return {"original": original, "paraphrases": paras, "dropped": [], "model": "m", "template_sha256": "t",
            "per_caption": 2, "partial": False, **kw}


def test_cache_appends_whole_lines_repairs_a_torn_tail_and_latest_record_wins(tmp_path):
    out = tmp_path / "sub" / "p.jsonl"
    cache = ParaphraseCache(out)
    cache.append(_record("A.", ["a1", "a2"]))
    cache.append(_record("B.", ["b1"], partial=True))
    cache.close()
    full = out.read_bytes()
    out.write_bytes(full + full.splitlines(keepends=True)[0][:25])  # a kill in the middle of a third line
    assert set(read_records(out)) == {"A.", "B."}  # the reader ignores the torn line
    cache = ParaphraseCache(out)
    assert cache.repaired_tail and out.read_bytes() == full  # and the writer cuts it off before appending
    cache.append(_record("B.", ["b1", "b2"]))  # --retry-partial result supersedes the partial one
    cache.close()
    assert load_paraphrases(out) == {"A.": ["a1", "a2"], "B.": ["b1", "b2"]}
    assert len(out.read_text().splitlines()) == 3


def test_cache_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        cache = ParaphraseCache(tmp_path / "p.jsonl")
        cache.append(_record("A.", ["a1"]))
        cache.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p.jsonl").stat().st_mode) == 0o664


def test_cache_refuses_results_of_another_model_or_template(tmp_path):
    out = tmp_path / "p.jsonl"
    c = ParaphraseCache(out)
    c.append(_record("A.", ["a1"]))
    c.close()
    ParaphraseCache(out).check_compatible("m", "t", 2)
    with pytest.raises(UserError, match="model m, not gpt-4o"):
        ParaphraseCache(out).check_compatible("gpt-4o", "t", 2)
    with pytest.raises(UserError, match="per_caption 2, not 5"):
        ParaphraseCache(out).check_compatible("m", "t", 5)


def test_bad_line_in_the_middle_is_a_user_error_with_line_number(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(json.dumps(_record("A.", ["a"])) + "\n{oops\n" + json.dumps(_record("B.", ["b"])) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: not a JSON line"):
        load_paraphrases(out)
    out.write_text(json.dumps({"original": "A.", "paraphrases": "not a list"}) + "\n")
    with pytest.raises(UserError, match=r":1: not a paraphrase record"):
        load_paraphrases(out)
    with pytest.raises(UserError, match="paraphrase file not found"):
        load_paraphrases(tmp_path / "missing.jsonl")


def test_load_paraphrases_skips_empty_and_hash_ignores_order_and_bookkeeping(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    recs = [_record("A.", ["a1", "a2"]), _record("B.", []), _record("C.", ["c1"])]
    a.write_text("".join(json.dumps(r) + "\n" for r in recs))
    b.write_text("".join(json.dumps(dict(r, created="later", requests=2)) + "\n" for r in reversed(recs)))
    assert load_paraphrases(a) == {"A.": ["a1", "a2"], "C.": ["c1"]}
    assert paraphrases_sha256(a) == paraphrases_sha256(b)
    b.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert paraphrases_sha256(a) != paraphrases_sha256(b)


def test_plan_counts_requests_tokens_and_cost():
    caps = [f"Generate an image with {i} polyps." for i in range(2, 12)]
    cfg = ParaphraseConfig(per_caption=10, captions_per_request=4, model="gpt-3.5-turbo-0125")
    plan = make_plan(caps, set(caps[:3]), cfg, load_template())
    assert (plan.captions, plan.cached, len(plan.to_send), len(plan.batches)) == (10, 3, 7, 2)
    assert plan.est_prompt_tokens > 2 * 200 and plan.est_completion_tokens > 7 * 10 * 8
    in_price, out_price = price_for("gpt-3.5-turbo")
    assert plan.est_cost_usd == pytest.approx((plan.est_prompt_tokens * in_price
                                               + plan.est_completion_tokens * out_price) / 1e6)
    assert "2025-06" in plan.price_note
    assert make_plan(caps, set(), ParaphraseConfig(model="my-local-llm"), load_template()).est_cost_usd is None


def test_batches_respect_the_answer_token_budget():
    from harness.paraphrase import make_batches

    short = ["Generate an image with 1 polyp."] * 5
    long = ["Generate an image with an an abnormality located in the center, upper-left, upper-right, lower-left, "
            "lower-right, center-left, center-right, upper-center and lower-center."] * 3
    cfg = ParaphraseConfig(per_caption=25, captions_per_request=4, output_token_budget=3000)
    assert [len(b) for b in make_batches(short, cfg)] == [4, 1]  # the count bound
    assert [len(b) for b in make_batches(long + short, cfg)] == [2, 4, 2]  # 25 x ~50 tokens: two long per request
    tiny = ParaphraseConfig(per_caption=25, output_token_budget=10)
    assert [len(b) for b in make_batches(long, tiny)] == [1, 1, 1]  # over budget alone: still sent, alone
    assert sum(make_batches(long + short, cfg), []) == long + short  # order kept, nothing lost


def test_sources_devset_and_train_side_of_split(sample_dir, tmp_path):
    from harness.data import load_devset
    from harness.split import write_split

    ds = load_devset(sample_dir)
    src = collect_captions(sample_dir)
    assert src.captions == ds.unique_prompts() and src.info["csv_sha256"] == ds.csv_sha256

    split_path = tmp_path / "split.json"
    split = write_split(sample_dir, split_path, val_images=8)
    tr = collect_captions(split_path, sample_dir)
    train_caps = {r.prompt for r in ds.rows if r.filename in set(split["train"])}
    val_caps = {r.prompt for r in ds.rows if r.filename in set(split["val"])}
    assert set(tr.captions) == train_caps and len(tr.captions) == len(train_caps)
    assert tr.info["side"] == "train" and tr.info["val_only_captions_not_sent"] == len(val_caps - train_caps) > 0
    assert not (val_caps - train_caps) & set(tr.captions)

    with pytest.raises(UserError, match="needs --data DIR") as e:
        collect_captions(split_path)
    assert "split.json" in str(e.value)
    with pytest.raises(UserError, match="only for a SPLIT.json"):
        collect_captions(sample_dir, sample_dir)
    with pytest.raises(UserError, match="not found"):
        collect_captions(tmp_path / "nope")


def test_config_validation_and_unknown_keys():
    from harness.config import from_dict

    with pytest.raises(UserError, match="per_caption must be >= 1"):
        ParaphraseConfig(per_caption=0).validate()
    with pytest.raises(UserError, match="unknown key"):
        from_dict(ParaphraseConfig, {"per_captoin": 3})


def test_transport_helpers():
    assert redact("Incorrect API key provided: sk-abc123XYZ.", ("sk-abc123XYZ",)) == "Incorrect API key provided: ***."
    assert safe_url("https://user:pw@host:8443/v1?key=sk-1") == "https://host:8443/v1"
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    from email.utils import formatdate
    import time

    assert 5 < retry_after_seconds({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
