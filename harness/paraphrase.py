"""GPT paraphrase expansion of the dev captions (`harness paraphrase`) and the reader the trainers use.

Flow: unique captions (all of a dev set, or the TRAIN side of a split) -> batches of `captions_per_request` ->
chat-completions with a JSON schema -> each paraphrase screened (attributes preserved, not a duplicate) -> one JSONL
line per caption appended to the cache as soon as its batch is answered.

The cache is the output. One line per caption:
  {"original", "paraphrases" (kept), "dropped": [{"text", "reason", "detail"}], "returned", "partial", "note",
   "model", "template_sha256", "per_caption", "response_format", "requests", "format", "created"}
Each line goes out in a single write() on an O_APPEND descriptor, so a SIGKILL leaves at most one torn last line;
the next run drops it and asks for that caption again. A caption whose answers were all malformed (not the
expected JSON, after the client's retries) gets no line: it is reported as failed, the run exits non-zero, and a
rerun sends only captions that have no line holding an answer (and, with `retry_partial`, those whose line is
partial). A later line for the same caption supersedes an earlier one.
Run-level provenance (config, seed, source data hashes, template, summary) goes to `<out>.meta.json` (atomic).

Trainers read the result with `load_paraphrases(path)` and record `paraphrases_sha256(path)` in their run config.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from harness.config import to_dict
from harness.errors import UserError
from harness.io import sha256_bytes, write_json

FORMAT = "harness-paraphrases/1"
META_FORMAT = "harness-paraphrases-meta/1"

# USD per 1M tokens (input, output), standard tier, from openai.com/api/pricing as of PRICES_DATE. Only for the
# --dry-run estimate; a model not listed gets no cost estimate. Dated snapshots match by prefix.
PRICES_DATE = "2025-06"
PRICES_PER_1M = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}

# Structured output: a list of {id, paraphrases}. Ids (1..k within a request) instead of echoed captions: the
# model cannot "fix" an original while echoing it, and the answer is shorter.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"},
                               "paraphrases": {"type": "array", "items": {"type": "string"}}},
                "required": ["id", "paraphrases"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}

DROP_REASONS = ("not_text", "empty", "same_as_original", "duplicate", "near_duplicate", "too_long",
                "attributes_changed", "surplus")


@dataclass
class ParaphraseConfig:
    model: str = "gpt-3.5-turbo"  # the seed paper's model
    per_caption: int = 25  # the paper went from 483 prompts to > 11,000 (~23 each)
    captions_per_request: int = 4  # at most this many captions per request ...
    output_token_budget: int = 3000  # ... and no more than this many estimated answer tokens (gpt-3.5-turbo stops
    # at 4,096; a cut-off answer is unparseable JSON, so long location captions go in smaller batches)
    concurrency: int = 4
    temperature: float = 1.0
    seed: int = 0  # sent as the API's best-effort `seed`; also seeds the backoff jitter
    timeout: float = 120.0  # seconds per HTTP request
    max_retries: int = 6  # per request, for 429 / 5xx / timeouts / connection errors
    backoff_base: float = 1.0  # seconds; attempt k waits ~ base * 2^k (jittered), capped at backoff_max
    backoff_max: float = 60.0
    response_format: str = "auto"  # auto (json_schema, stepping down if refused) | json_schema | json_object | text
    near_duplicate: float = 0.9  # difflib ratio on normalised text at or above which two texts are near duplicates
    max_words: int = 60  # longer paraphrases would be cut by CLIP's 77-token limit, losing attributes at the end

    def validate(self) -> None:
        """The same bounds as the CLI's click ranges, for values from a --config file."""
        floats = {"temperature": self.temperature, "timeout": self.timeout, "backoff_base": self.backoff_base,
                  "backoff_max": self.backoff_max, "near_duplicate": self.near_duplicate}
        for name, v in floats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"paraphrase config: {name} must be a finite number, got {v!r}")
        ints = {"per_caption": self.per_caption, "captions_per_request": self.captions_per_request,
                "output_token_budget": self.output_token_budget, "concurrency": self.concurrency,
                "seed": self.seed, "max_retries": self.max_retries, "max_words": self.max_words}
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"paraphrase config: {name} must be an integer, got {v!r}")
        checks = [
            (self.per_caption >= 1, "per_caption must be >= 1"),
            (self.captions_per_request >= 1, "captions_per_request must be >= 1"),
            (self.output_token_budget >= 1, "output_token_budget must be >= 1"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.timeout > 0, "timeout must be > 0"),
            (0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2] (the API's range)"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32 - 1]"),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (self.backoff_base >= 0 and self.backoff_max >= 0, "backoff delays must be >= 0"),
            (0.0 < self.near_duplicate <= 1.0, "near_duplicate must be in (0, 1]"),
            (self.max_words >= 1, "max_words must be >= 1"),
            (self.response_format in ("auto", "json_schema", "json_object", "text"),
             "response_format must be auto, json_schema, json_object or text"),
            (bool(self.model.strip()), "model must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"paraphrase config: {msg}")


# ------------------------------------------------------------------------------------------------------- template

_SECTION_RX = re.compile(r"^## (system|user)[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Template:
    system: str
    user: str
    sha256: str
    path: Path

    def messages(self, captions: list[str], per_caption: int) -> list[dict[str, str]]:
        listing = "[\n" + ",\n".join(json.dumps({"id": i, "caption": c}, ensure_ascii=False)
                                     for i, c in enumerate(captions, 1)) + "\n]"

        def fill(s: str) -> str:
            return s.replace("{{per_caption}}", str(per_caption)).replace("{{captions}}", listing)

        return [{"role": "system", "content": fill(self.system)}, {"role": "user", "content": fill(self.user)}]


def default_template_path() -> Path:
    """prompts/paraphrase.md of the repository (editable install), else of the current directory."""
    candidates = [Path(__file__).resolve().parents[1] / "prompts" / "paraphrase.md",
                  Path.cwd() / "prompts" / "paraphrase.md"]
    for p in candidates:
        if p.is_file():
            return p
    raise UserError("no paraphrase template found (looked for prompts/paraphrase.md in the repository and the "
                    "current directory); pass --template PATH")


def load_template(path: str | Path | None = None) -> Template:
    path = Path(path) if path is not None else default_template_path()
    if not path.is_file():
        raise UserError("template file not found", path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("template is not UTF-8 text", path) from None
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)  # comments are notes for the editor, not the model
    parts = _SECTION_RX.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    sections: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in sections:
            raise UserError(f"template has two '## {name}' sections", path)
        sections[name] = body.strip()
    if "user" not in sections:
        raise UserError("template needs a '## user' section (and optionally '## system')", path)
    joined = sections.get("system", "") + sections["user"]
    for ph in ("{{captions}}", "{{per_caption}}"):
        if ph not in joined:
            raise UserError(f"template never uses the placeholder {ph}", path)
    if "{{captions}}" not in sections["user"]:
        raise UserError("the {{captions}} placeholder must be in the '## user' section", path)
    return Template(system=sections.get("system", ""), user=sections["user"], sha256=sha256_bytes(data), path=path)


# -------------------------------------------------------------------------------------------------------- sources


@dataclass
class CaptionSource:
    captions: list[str]  # unique, in order of first appearance in prompt-gt.csv
    info: dict[str, Any]  # provenance: kind, data_dir, csv_sha256, split_sha256, side, counts


def collect_captions(source: str | Path, data_dir: str | Path | None = None) -> CaptionSource:
    """Unique captions of a dev-set directory, or of the TRAIN side of SPLIT.json (which needs `data_dir`: the split
    records the CSV's hash but not its location). Validation captions are never sent, so no paraphrase of a
    validation prompt can reach training."""
    from harness.data import load_devset

    source = Path(source)
    if source.is_dir():
        if data_dir is not None:
            raise UserError("--data is only for a SPLIT.json source; SOURCE is already a dev-set directory", source)
        ds = load_devset(source)
        caps = ds.unique_prompts()
        return CaptionSource(caps, {"kind": "devset", "data_dir": str(source), "csv_sha256": ds.csv_sha256,
                                    "side": "all", "unique_captions": len(caps)})
    if not source.exists():
        raise UserError("not found (expected a dev-set directory or a SPLIT.json)", source)
    from harness.split import check_split_matches, load_split

    split = load_split(source)
    if data_dir is None:
        raise UserError("a SPLIT.json source needs --data DIR, the dev set the split was made from", source)
    ds = load_devset(data_dir)
    check_split_matches(split, ds)
    train, val = set(split.train), set(split.val)
    caps = list(dict.fromkeys(r.prompt for r in ds.rows if r.filename in train))
    val_caps = {r.prompt for r in ds.rows if r.filename in val}
    return CaptionSource(caps, {
        "kind": "split", "data_dir": str(data_dir), "split": str(source), "split_sha256": split.sha256,
        "csv_sha256": ds.csv_sha256, "side": "train", "unique_captions": len(caps),
        # Templated captions recur across images: a caption on both sides is still a training caption.
        "val_only_captions_not_sent": len(val_caps - set(caps)),
        "captions_on_both_sides": len(val_caps & set(caps)),
    })


# ------------------------------------------------------------------------------------------------------ screening

_ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    """Comparison key: lower case, punctuation -> space (size signs kept), articles dropped, spaces collapsed."""
    words = re.sub(r"[^a-z0-9<>/\-]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _near(a: str, b: str, threshold: float) -> bool:
    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return m.real_quick_ratio() >= threshold and m.quick_ratio() >= threshold and m.ratio() >= threshold


def _describe_change(diff: dict[str, tuple[frozenset, frozenset]]) -> str:
    parts = []
    for attr, (lost, added) in sorted(diff.items()):
        bits = [f"-{v}" for v in sorted(lost)] + [f"+{v}" for v in sorted(added)]
        parts.append(f"{attr} {' '.join(bits)}")
    return "; ".join(parts)


def screen(original: str, raw: list[Any], cfg: ParaphraseConfig) -> tuple[list[str], list[dict[str, str]]]:
    """Kept paraphrases (at most cfg.per_caption) and the dropped ones with reason and detail.

    A paraphrase is kept only if `captions.extract_attributes` finds exactly the original's numbers, sizes, colours,
    locations, instruments, findings (named, or implied by a Paris class or a size), category nouns, procedure,
    Paris classes and negations in it, and no word outside the caption vocabulary and its plain words ("ulcer",
    "bleeding", an organ, a morphology) that the original does not have.
    """
    from harness.captions import attribute_differences

    kept: list[str] = []
    keys: list[str] = []
    dropped: list[dict[str, str]] = []
    orig_key = normalise(original)

    def drop(text: Any, reason: str, detail: str = "") -> None:
        dropped.append({"text": text if isinstance(text, str) else json.dumps(text), "reason": reason,
                        "detail": detail})

    for item in raw:
        if not isinstance(item, str):
            drop(item, "not_text")
            continue
        text = " ".join(item.split())
        key = normalise(text)
        if not key:
            drop(item, "empty")
        elif key == orig_key:
            drop(text, "same_as_original")
        elif text in kept:
            drop(text, "duplicate")
        elif key in keys or _near(key, orig_key, cfg.near_duplicate) or \
                any(_near(key, k, cfg.near_duplicate) for k in keys):
            drop(text, "near_duplicate")
        elif len(text.split()) > cfg.max_words:
            drop(text, "too_long", f"{len(text.split())} words > {cfg.max_words}")
        elif diff := attribute_differences(original, text):
            drop(text, "attributes_changed", _describe_change(diff))
        elif len(kept) >= cfg.per_caption:
            drop(text, "surplus")
        else:
            kept.append(text)
            keys.append(key)
    return kept, dropped


# ------------------------------------------------------------------------------------------------ answer parsing


def parse_answer(content: str | None, finish_reason: str | None, n: int) -> tuple[dict[int, list], str | None]:
    """{id: raw paraphrase list} from a model answer, and a problem string when the answer is unusable."""
    cut = " (cut off: finish_reason=length)" if finish_reason == "length" else ""
    if not isinstance(content, str) or not content.strip():
        return {}, "empty answer" + cut
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:  # models in text mode like code fences
        text = fence.group(1)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        i, j = text.find("{"), text.rfind("}")
        try:
            data = json.loads(text[i:j + 1]) if 0 <= i < j else None
        except (json.JSONDecodeError, RecursionError):
            data = None
        if data is None:
            return {}, "malformed JSON" + cut
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list):
        return {}, "malformed answer: no 'items' list" + cut
    out: dict[int, list] = {}
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("paraphrases"), list):
            continue
        i = it.get("id")
        if isinstance(i, str) and i.strip().isdigit():
            i = int(i)
        if isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= n and i not in out:
            out[i] = it["paraphrases"]
    if not out:
        return {}, "malformed answer: no usable items" + cut
    if not any(_n_text(p) for p in out.values()):
        return {}, "malformed answer: no paraphrase text in any item" + cut
    return out, None


# ---------------------------------------------------------------------------------------------------------- cache


def _read_lines(path: Path) -> tuple[list[tuple[int, dict]], bytes | None, int]:
    """Complete records (line number, dict), the torn tail (bytes after the last newline, if any) and the byte
    offset where that tail starts. A bad complete line is a UserError: only the last line can be torn by a kill."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:] or None
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"not a JSON line ({e}); only a torn last line is tolerated", path, lineno) from None
        if not (isinstance(rec, dict) and isinstance(rec.get("original"), str)
                and isinstance(rec.get("paraphrases"), list) and all(isinstance(p, str) for p in rec["paraphrases"])):
            raise UserError("not a paraphrase record (needs 'original' and a list of 'paraphrases')", path, lineno)
        records.append((lineno, rec))
    return records, tail, end


def read_records(path: str | Path) -> dict[str, dict]:
    """original -> its latest record. A torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError("paraphrase file not found", path)
    records, tail, _ = _read_lines(path)
    if tail is not None:
        try:
            rec = json.loads(tail)
            if isinstance(rec, dict) and isinstance(rec.get("original"), str) \
                    and isinstance(rec.get("paraphrases"), list):
                records.append((-1, rec))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return {rec["original"]: rec for _, rec in records}


def load_paraphrases(path: str | Path) -> dict[str, list[str]]:
    """original caption -> kept paraphrases, for the trainers. Captions with no kept paraphrase are left out, so
    `caption in result` means it has at least one."""
    return {o: list(r["paraphrases"]) for o, r in read_records(path).items() if r["paraphrases"]}


def training_paraphrases(path: str | Path | None, strategy: str) -> tuple[dict[str, list[str]] | None, str | None]:
    """(paraphrases, sha256) a trainer uses for --paraphrases PATH with --paraphrase-strategy; (None, None) when no
    file is given, which only the strategy "none" allows."""
    if not path:
        if strategy != "none":
            raise UserError(f"--paraphrase-strategy {strategy} needs --paraphrases FILE")
        return None, None
    path = Path(path)
    if not path.is_file():
        raise UserError("paraphrase file not found", path)
    return load_paraphrases(path), paraphrases_sha256(path)


def paraphrases_sha256(path: str | Path) -> str:
    """Hash of what `load_paraphrases` returns (canonical JSON), for run configs: independent of line order (which
    concurrency makes arbitrary), superseded lines and bookkeeping fields, so equal content gives an equal hash."""
    mapping = load_paraphrases(path)
    return sha256_bytes(json.dumps(mapping, sort_keys=True, ensure_ascii=False).encode("utf-8"))


class ParaphraseCache:
    """The output JSONL, opened for appending. Opening repairs a torn last line so appends start on a fresh line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.repaired_tail = False
        if self.path.is_file():
            records, tail, end = _read_lines(self.path)
            if tail is not None:
                self.repaired_tail = True
                with open(self.path, "r+b") as f:
                    f.truncate(end)  # the torn line's caption is simply asked again
            self.records = {rec["original"]: rec for _, rec in records}
        self._fd: int | None = None

    def check_compatible(self, model: str, template_sha256: str, per_caption: int) -> None:
        check_compatible(self.path, self.records, model, template_sha256, per_caption)

    def append(self, record: dict) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # umask applies
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        # One write() per line: a kill cannot interleave two lines, only cut the last one.
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.records[record["original"]] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_compatible(path: Path, records: dict[str, dict], model: str, template_sha256: str,
                     per_caption: int) -> None:
    """One file = one (model, template, per_caption): mixing would make the file's meaning ambiguous."""
    want = {"model": model, "template_sha256": template_sha256, "per_caption": per_caption}
    for rec in records.values():
        for k, v in want.items():
            if rec.get(k) != v:
                shown = (lambda x: str(x)[:12]) if k == "template_sha256" else str
                raise UserError(f"holds results made with {k} {shown(rec.get(k))}, not {shown(v)}; use another "
                                f"--out (or delete the file to start over)", path)


def meta_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".meta.json")


# ----------------------------------------------------------------------------------------------- plan / dry run


@dataclass
class Plan:
    captions: int
    cached: int  # captions already in the cache (skipped)
    to_send: list[str]
    batches: list[list[str]]  # one request each
    est_prompt_tokens: int
    est_completion_tokens: int
    est_cost_usd: float | None
    price_note: str
    first_request: list[dict[str, str]] | None


def _est_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)  # ~4 characters per token for English (no tokenizer needed offline)


def price_for(model: str) -> tuple[float, float] | None:
    for name in sorted(PRICES_PER_1M, key=len, reverse=True):
        if model == name or model.startswith(name + "-"):
            return PRICES_PER_1M[name]
    return None


def _answer_tokens(caption: str, per_caption: int) -> int:
    # Each paraphrase ~ its original's length plus JSON quoting, and a little per item.
    return per_caption * (_est_tokens(caption) + 3) + 8


def make_batches(todo: list[str], cfg: ParaphraseConfig) -> list[list[str]]:
    """Consecutive groups of at most captions_per_request captions whose estimated answer fits
    output_token_budget (a caption over the budget on its own still gets a request of its own)."""
    batches: list[list[str]] = []
    cur: list[str] = []
    used = 10
    for c in todo:
        need = _answer_tokens(c, cfg.per_caption)
        if cur and (len(cur) >= cfg.captions_per_request or used + need > cfg.output_token_budget):
            batches.append(cur)
            cur, used = [], 10
        cur.append(c)
        used += need
    if cur:
        batches.append(cur)
    return batches


def make_plan(captions: list[str], cached: set[str], cfg: ParaphraseConfig, template: Template) -> Plan:
    todo = [c for c in captions if c not in cached]
    batches = make_batches(todo, cfg)
    p_tok = sum(_est_tokens(m["content"]) + 4 for b in batches for m in template.messages(b, cfg.per_caption))
    c_tok = sum(_answer_tokens(c, cfg.per_caption) for c in todo) + 10 * len(batches)
    price = price_for(cfg.model)
    cost = None if price is None else (p_tok * price[0] + c_tok * price[1]) / 1e6
    note = (f"prices as of {PRICES_DATE}: ${price[0]:.2f} / ${price[1]:.2f} per 1M input / output tokens"
            if price else f"no price for {cfg.model!r} in the table (as of {PRICES_DATE})")
    first = template.messages(batches[0], cfg.per_caption) if batches else None
    return Plan(len(captions), len(captions) - len(todo), todo, batches, p_tok, c_tok, cost, note, first)


# ---------------------------------------------------------------------------------------------------------- run


@dataclass
class Summary:
    unique_before: int  # unique original captions of the source
    unique_after: int  # originals plus distinct kept paraphrases
    kept: int
    dropped: dict[str, int]  # reason -> count
    changed_attributes: dict[str, int]  # for attributes_changed: attribute -> count
    captions_done: int  # captions of the source with a record
    partial: int  # records with fewer paraphrases returned than asked
    failed: int  # captions with no usable answer after all retries this run (no record; a rerun resends them)
    failed_examples: list[str]
    sent_this_run: int  # captions requested this run
    requests: int  # HTTP requests this run, retries included
    retries: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    response_format: str | None
    format_changes: list[str] = field(default_factory=list)


def summarise(captions: list[str], records: dict[str, dict]) -> dict[str, Any]:
    """Counts over the cache records of `captions` (what the file holds, whichever run wrote it)."""
    dropped: Counter = Counter()
    changed: Counter = Counter()
    kept = partial = done = 0
    after = set(captions)
    for c in captions:
        rec = records.get(c)
        if rec is None or not is_done(rec):
            continue
        done += 1
        kept += len(rec["paraphrases"])
        after.update(rec["paraphrases"])
        partial += bool(rec.get("partial"))
        for d in rec.get("dropped", []):
            dropped[d.get("reason", "?")] += 1
            if d.get("reason") == "attributes_changed":
                changed.update(part.split(" ", 1)[0] for part in d.get("detail", "").split("; ") if part)
    return {"unique_before": len(set(captions)), "unique_after": len(after), "kept": kept,
            "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]} | {r: n for r, n in dropped.items()
                                                                            if r not in DROP_REASONS},
            "changed_attributes": dict(changed.most_common()), "captions_done": done, "partial": partial}


async def _paraphrase_batch(batch: list[str], client, template: Template, cfg: ParaphraseConfig,
                            stamp: dict[str, Any]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Ask for one batch: (records, failed captions with the reason).

    An answer that is not the expected JSON (no `items`, no usable item) is a fault the client retries under the
    retry policy; when retries run out the first ask raises RequestFailed (the whole batch fails). Captions the
    answer left out or gave too few paraphrases are asked again once. A caption that ends with no paraphrase text at
    all is a failure, never a record: a rerun must send it again. One with some but fewer than asked is recorded as
    partial (so is one whose re-ask failed after a usable first answer)."""
    from harness.paraphrase_client import MalformedAnswer, RequestFailed

    raw: dict[str, list] = {c: [] for c in batch}
    notes: dict[str, str | None] = {c: None for c in batch}
    tries: dict[str, int] = {c: 0 for c in batch}
    pending = list(batch)
    for round_ in range(2):
        n = len(pending)

        def parse(comp) -> dict[int, list]:
            answer, problem = parse_answer(comp.content, comp.finish_reason, n)
            if problem:
                raise MalformedAnswer(problem)
            return answer

        try:
            answer = await client.complete(template.messages(pending, cfg.per_caption), parse)
        except RequestFailed as e:
            if round_ == 0:
                raise
            for c in pending:
                notes[c] = f"{notes[c]}; re-ask failed: {e}"
            break
        for i, c in enumerate(pending, 1):
            tries[c] += 1
            raw[c] += answer.get(i, [])
            got = _n_text(raw[c])
            notes[c] = (None if got >= cfg.per_caption else
                        f"returned {got} of {cfg.per_caption}" if got else "no paraphrase text in the answer")
        pending = [c for c in pending if notes[c] is not None]
        if not pending:
            break
    records, failed = [], []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for c in batch:
        if not _n_text(raw[c]):
            failed.append((c, notes[c] or "no paraphrase text in the answer"))
            continue
        kept, dropped = screen(c, raw[c], cfg)
        records.append({"format": FORMAT, "original": c, "paraphrases": kept, "dropped": dropped,
                        "returned": len(raw[c]), "partial": notes[c] is not None, "note": notes[c],
                        "requests": tries[c], "created": now, **stamp,
                        "response_format": client.format})
    return records, failed


def _n_text(items: list) -> int:
    return sum(isinstance(p, str) and bool(p.strip()) for p in items)


def is_done(record: dict) -> bool:
    """A record that holds an answer: some paraphrase text came back (kept, or dropped by the screen). Caches
    written before malformed answers were faults can hold records of nothing (an HTML page or an empty answer,
    stored as partial): those captions are sent again."""
    return bool(record.get("paraphrases")) or any(
        isinstance(d, dict) and d.get("reason") not in ("not_text", "empty") for d in record.get("dropped") or [])


async def _run_async(batches: list[list[str]], cfg: ParaphraseConfig, client, template: Template,
                     cache: ParaphraseCache, on_advance: Callable[[int, int], None]) -> list[tuple[str, str]]:
    """Failed captions (caption, reason); everything answered is already appended to the cache."""
    stamp = {"model": cfg.model, "template_sha256": template.sha256, "per_caption": cfg.per_caption}
    queue: asyncio.Queue = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    failed: list[tuple[str, str]] = []

    async def worker() -> None:
        from harness.paraphrase_client import RequestFailed

        while True:
            try:
                batch = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                records, lost = await _paraphrase_batch(batch, client, template, cfg, stamp)
            except RequestFailed as e:
                failed.extend((c, str(e)) for c in batch)
            else:
                for r in records:
                    cache.append(r)  # single-threaded event loop: appends never interleave
                failed.extend(lost)
            on_advance(len(batch), client.stats.tokens)

    workers = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, len(batches)))]
    try:
        await asyncio.gather(*workers)
    finally:  # a fatal error or Ctrl-C in one worker stops the others; their in-flight requests are abandoned
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.aclose()
    return failed


@dataclass
class ParaphraseResult:
    plan: Plan
    summary: Summary | None  # None for a dry run
    out: Path
    meta: Path | None
    repaired_tail: bool
    source: CaptionSource
    template: Template


def run_paraphrase(source: CaptionSource, out: str | Path, cfg: ParaphraseConfig, template: Template, *,
                   api_key: str | None, base_url: str | None = None, dry_run: bool = False,
                   retry_partial: bool = False, on_start: Callable[[int], None] | None = None,
                   on_advance: Callable[[int, int], None] | None = None,
                   on_notice: Callable[[str], None] | None = None) -> ParaphraseResult:
    """Paraphrase the source's captions missing from `out` (see module docstring). `api_key` is used only to build
    the client; it is never stored. Returns the plan and, unless dry_run, the summary; raises UserError for fatal
    API faults after keeping everything already answered."""
    from harness.paraphrase_client import ChatClient, TransportStats, safe_url

    cfg.validate()
    out = Path(out)
    cache = ParaphraseCache(out) if not dry_run else None  # a dry run reads the file but never repairs it
    existing = cache.records if cache else (read_records(out) if out.is_file() else {})
    check_compatible(out, existing, cfg.model, template.sha256, cfg.per_caption)
    done = {c for c, r in existing.items() if is_done(r) and not (retry_partial and r.get("partial"))}
    plan = make_plan(source.captions, done, cfg, template)
    result = ParaphraseResult(plan, None, out, None, bool(cache and cache.repaired_tail), source, template)
    if dry_run:
        return result
    if not api_key:
        raise UserError("OPENAI_API_KEY is not set (any non-empty value works for local servers that ignore it)")
    client = None
    if plan.batches:
        client = ChatClient(model=cfg.model, api_key=api_key, base_url=base_url, timeout=cfg.timeout,
                            max_retries=cfg.max_retries, backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max,
                            response_format=cfg.response_format, schema=ANSWER_SCHEMA,
                            temperature=cfg.temperature, seed=cfg.seed, on_notice=on_notice)
    if on_start:
        on_start(len(plan.to_send))
    failed: list[tuple[str, str]] = []
    try:
        if client is not None:
            failed = asyncio.run(_run_async(plan.batches, cfg, client, template, cache,
                                            on_advance or (lambda n, t: None)))
    finally:
        cache.close()
        stats = client.stats if client is not None else TransportStats()
        counts = summarise(source.captions, cache.records)
        summary = Summary(**counts, failed=len(failed), failed_examples=[f"{c!r}: {why}" for c, why in failed[:3]],
                          sent_this_run=len(plan.to_send), requests=stats.requests, retries=dict(stats.retries),
                          prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                          response_format=client.format if client is not None else None,
                          format_changes=list(stats.format_changes))
        result.summary = summary
        if out.is_file():  # provenance of what the file holds now, even after a fatal error
            result.meta = write_json(meta_path(out), {
                "format": META_FORMAT, "paraphrases": out.name, "paraphrases_sha256": paraphrases_sha256(out),
                "config": to_dict(cfg), "seed": cfg.seed, "source": source.info,
                "template": {"path": str(template.path), "sha256": template.sha256},
                "base_url": safe_url(base_url or os.environ.get("OPENAI_BASE_URL")) or "https://api.openai.com/v1",
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "summary": asdict(summary),
            })
    return result


def format_summary(s: Summary) -> list[str]:
    """Plain lines for the terminal (the CLI adds colour)."""
    lines = [
        f"unique prompts: {s.unique_before} -> {s.unique_after}",
        f"captions with results: {s.captions_done}/{s.unique_before} ({s.partial} partial)"
        + (f", {s.failed} failed this run (rerun to retry)" if s.failed else ""),
        f"paraphrases kept: {s.kept}; dropped: " + (", ".join(f"{r} {n}" for r, n in s.dropped.items()) or "none"),
    ]
    if s.changed_attributes:
        lines.append("  attributes changed: " + ", ".join(f"{a} {n}" for a, n in s.changed_attributes.items()))
    lines.append(f"this run: {s.sent_this_run} captions in {s.requests} HTTP requests, "
                 f"{s.prompt_tokens + s.completion_tokens} tokens ({s.prompt_tokens} in / {s.completion_tokens} out)"
                 + (f", retries {dict(s.retries)}" if s.retries else ""))
    if s.format_changes:
        lines.append(f"response format stepped down: {', '.join(s.format_changes)}")
    return lines


__all__ = ["ParaphraseConfig", "Template", "load_template", "collect_captions", "screen", "parse_answer",
           "load_paraphrases", "paraphrases_sha256", "read_records", "ParaphraseCache", "make_batches", "make_plan",
           "run_paraphrase", "format_summary"]
