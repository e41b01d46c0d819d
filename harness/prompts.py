"""Prompt files: one prompt per line, the format of the challenge's test file.

Reading rules (the submission's image k must belong to the test file's prompt k, so these are strict):
- UTF-8 (an optional BOM is dropped and noted); anything else is a UserError naming file, line and byte offset;
- only the line ending (LF or CRLF) is stripped - everything else, leading/trailing spaces included, is verbatim;
- blank lines (empty or whitespace only) are not prompts; they are reported;
- prompt index = 1-based position among the non-blank lines (image 00001.png is prompt 1).

The test file itself (`ImageCLEFmed-MEDVQA-GI-2024-Testing-Propmpts.txt`: 5,000 lines over 260 unique prompts, all
of them dev captions) is not public; `synthesize_test_prompts` makes a stand-in with the same shape.
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from harness.errors import UserError
from harness.io import sha256_bytes

BOM = b"\xef\xbb\xbf"


@dataclass
class PromptFile:
    path: Path
    prompts: list[str]  # prompt k (1-based) is prompts[k - 1]
    blank_lines: list[int]  # 1-based file line numbers of blank lines
    sha256: str  # of the file's bytes: generation and packaging record it
    line_numbers: list[int] = field(default_factory=list)  # file line of each prompt
    bom: bool = False


def read_prompt_file(path: str | Path) -> PromptFile:
    path = Path(path)
    if not path.is_file():
        raise UserError("prompt file not found", path)
    data = path.read_bytes()
    sha = sha256_bytes(data)
    bom = data.startswith(BOM)
    body = data[len(BOM):] if bom else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + (len(BOM) if bom else 0)
        line = body[: e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 (byte 0x{body[e.start]:02x} at byte offset {offset}); save the prompt file as "
                        "UTF-8", path, line) from None
    # Split on "\n" only (str.splitlines would also split on \x0b, \x1c, U+2028 ... inside a prompt).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    prompts: list[str] = []
    numbers: list[int] = []
    blanks: list[int] = []
    for i, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            blanks.append(i)
            continue
        prompts.append(line)
        numbers.append(i)
    if not prompts:
        what = "empty file" if not data else f"no prompts ({len(blanks)} blank lines)"
        raise UserError(f"{what}; expected one prompt per line", path)
    return PromptFile(path=path, prompts=prompts, blank_lines=blanks, sha256=sha, line_numbers=numbers, bom=bom)


def shipped_dev_captions() -> list[str]:
    """The 483 unique dev captions shipped with the package (harness/sample/dev_unique_captions.txt)."""
    ref = resources.files("harness.sample").joinpath("dev_unique_captions.txt")
    with resources.as_file(ref) as p:
        return read_prompt_file(p).prompts


def dev_captions(data_dir: str | Path | None) -> tuple[list[str], str]:
    """All caption rows of DIR (with repetition), or the shipped unique list; plus a label saying which."""
    if data_dir is None:
        return shipped_dev_captions(), "shipped list of 483 dev captions"
    from harness.data import load_devset

    ds = load_devset(data_dir)
    return [r.prompt for r in ds.rows], f"{ds.csv_path} ({len(ds.rows)} rows)"


@dataclass
class PromptReport:
    path: str
    sha256: str
    count: int
    unique: int
    blank_lines: list[int]
    longest: dict  # index, chars, words, prompt
    bom: bool
    reference: str
    not_in_dev: list[dict]  # index, prompt, closest dev caption (or None)
    whitespace_edges: list[int]  # prompt indices with leading/trailing whitespace (kept verbatim; usually a mistake)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def check_prompts(pf: PromptFile, captions: list[str], reference: str = "") -> PromptReport:
    """Facts about a prompt file and which prompts never occur in the dev captions (with the closest caption, to
    spot a near miss like a changed typo)."""
    known = set(captions)
    unique_known = sorted(known)
    longest_i = max(range(len(pf.prompts)), key=lambda i: (len(pf.prompts[i]), -i))
    missing: list[dict] = []
    closest_cache: dict[str, str | None] = {}
    for i, p in enumerate(pf.prompts, start=1):
        if p in known:
            continue
        if p not in closest_cache:
            m = difflib.get_close_matches(p, unique_known, n=1, cutoff=0.8)
            closest_cache[p] = m[0] if m else None
        missing.append({"index": i, "prompt": p, "closest": closest_cache[p]})
    return PromptReport(
        path=str(pf.path),
        sha256=pf.sha256,
        count=len(pf.prompts),
        unique=len(set(pf.prompts)),
        blank_lines=pf.blank_lines,
        longest={"index": longest_i + 1, "chars": len(pf.prompts[longest_i]),
                 "words": len(pf.prompts[longest_i].split()), "prompt": pf.prompts[longest_i]},
        bom=pf.bom,
        reference=reference,
        not_in_dev=missing,
        whitespace_edges=[i for i, p in enumerate(pf.prompts, start=1) if p != p.strip()],
    )


def synthesize_test_prompts(captions: list[str], n: int = 5000, n_unique: int = 260, seed: int = 0) -> list[str]:
    """A stand-in for the unpublished test file: `n` lines over `n_unique` distinct captions.

    Like the real file, every prompt is a dev caption. Captions are chosen (without replacement) and the extra lines
    drawn with probability proportional to how often each caption occurs in `captions` - pass all dev rows to get
    the dev frequencies, or a unique list for uniform weights. Every chosen caption occurs at least once; line
    order is shuffled. Deterministic in (captions, n, n_unique, seed).
    """
    freq = Counter(captions)
    pool = sorted(freq)  # sorted: the result must not depend on the order rows were read in
    if n_unique < 1 or n < 1:
        raise UserError(f"need n >= 1 and n_unique >= 1 (got n={n}, n_unique={n_unique})")
    if n_unique > len(pool):
        raise UserError(f"--unique {n_unique} is more than the {len(pool)} distinct captions available")
    if n < n_unique:
        raise UserError(f"--n {n} lines cannot hold {n_unique} distinct prompts")
    rng = random.Random(seed)
    # Weighted sampling without replacement (Efraimidis-Spirakis keys u^(1/w)).
    keyed = sorted(pool, key=lambda c: rng.random() ** (1.0 / freq[c]), reverse=True)
    chosen = sorted(keyed[:n_unique])
    extra = rng.choices(chosen, weights=[freq[c] for c in chosen], k=n - n_unique)
    lines = chosen + extra
    rng.shuffle(lines)
    return lines


def format_prompt_file(prompts: list[str]) -> str:
    """One prompt per line, LF line ends, final newline; refuses prompts that would not survive a round trip."""
    for i, p in enumerate(prompts, start=1):
        if "\n" in p or "\r" in p or not p.strip():
            raise UserError(f"prompt {i} is empty or contains a line break: {p!r}")
    return "".join(p + "\n" for p in prompts)


# ------------------------------------------------------------------------------------------------ prompt sources

SPLIT_VAL = "split:val"
SPLIT_TRAIN = "split:train"  # training captions: `harness fter` labels the images by their prompts


def validation_prompts(data_dir: str | Path, split_path: str | Path, images_per_prompt: int = 1,
                       seed: int = 0, side: str = "val") -> list[str]:
    """Prompts made of the validation images' own captions: for each validation image (sorted, as `harness score
    --real val` lists them) `images_per_prompt` of its captions, drawn without repetition while they last from a
    per-image shuffle seeded by (seed, image). The generated set then has the real set's prompt mix, so `score
    --real val` measures the model, not the difference between test prompts and validation captions."""
    from harness.data import load_devset
    from harness.split import check_split_matches, load_split

    if images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    devset = load_devset(Path(data_dir))
    split = load_split(Path(split_path))
    check_split_matches(split, devset)
    ids = split.side(side)  # side="train": the same for the training images (`--prompts split:train`)
    if not ids:
        raise UserError(f"the split has no {'validation' if side == 'val' else 'training'} images", split.path)
    by_image = devset.captions_by_image()
    out: list[str] = []
    for name in sorted(ids):
        caps = list(dict.fromkeys(by_image.get(name, [])))  # unique, in CSV order
        if not caps:
            raise UserError(f"{'validation' if side == 'val' else 'training'} image {name} has no caption",
                            devset.csv_path)
        random.Random(f"{seed}:{name}").shuffle(caps)
        out += [caps[j % len(caps)] for j in range(images_per_prompt)]
    return out


def resolve_prompt_source(source: str, run_dir: Path, run_config: dict, images_per_prompt: int = 1,
                          reader=None) -> PromptFile:
    """`--prompts` of `harness generate`: a prompt file, or `split:val` = the run's validation captions (for
    scoring; test prompts are for the submission). With --images-per-prompt K, split:val takes K captions per
    validation image and a prompt file has each line K times; the derived list is written to RUN/prompts/ and read
    back like any prompt file, so its sha256 is recorded like one. `reader` reads a prompt file in another format
    (a challenge profile's `read_prompts`, e.g. the 2025 JSON); default: one prompt per line."""
    from harness.io import write_text

    if source.startswith("split:"):
        if source not in (SPLIT_VAL, SPLIT_TRAIN):
            raise UserError(f"--prompts {source}: the split sources are {SPLIT_VAL} (validation captions, for "
                            f"scoring against --real val) and {SPLIT_TRAIN} (training captions, for `harness fter`); "
                            "test prompts come from a file")
        from harness.runs import open_run
        from harness.score import recorded_data_paths

        data_dir, split_path = recorded_data_paths(open_run(run_dir), run_config)
        if not data_dir or not split_path:
            raise UserError(f"--prompts {source}: the run's config names no split / dev-set directory", run_dir)
        side = source.split(":", 1)[1]
        prompts = validation_prompts(data_dir, split_path, images_per_prompt, side=side)
        derived = run_dir / "prompts" / f"split-{side}-x{images_per_prompt}.txt"
    else:
        pf = (reader or read_prompt_file)(source)
        if images_per_prompt == 1 and reader is None:
            return pf
        prompts = [p for p in pf.prompts for _ in range(images_per_prompt)]
        derived = run_dir / "prompts" / f"{Path(source).stem}-{pf.sha256[:8]}-x{images_per_prompt}.txt"
    write_text(derived, format_prompt_file(prompts))
    return read_prompt_file(derived)


# ------------------------------------------------------------------------------------------- JSON prompts (2025)


def read_json_pair_prompts(path: str | Path) -> PromptFile:
    """A MEDVQA-GI 2025 prompt JSON, flattened as the organisers do:
    `[c for qa in data.values() for pair in qa.values() for c in pair]`. Prompts come in pairs (0,1), (2,3), ...
    that describe the same content two ways, so every innermost list must hold exactly two non-empty strings."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError("prompt file not found", path)
    data = path.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte offset {e.start})", path) from None
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg})", path, e.lineno) from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object of question groups, got {type(obj).__name__}", path)
    prompts: list[str] = []
    for gk, qa in obj.items():
        if not isinstance(qa, dict):
            raise UserError(f"group {gk!r}: expected an object of prompt pairs, got {type(qa).__name__}", path)
        for pk, pair in qa.items():
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(c, str) and c.strip() for c in pair)):
                raise UserError(f"group {gk!r}, pair {pk!r}: expected a list of two non-empty prompt strings, got "
                                f"{pair!r:.80}", path)
            prompts.extend(pair)
    if not prompts:
        raise UserError("no prompts (an empty JSON object)", path)
    return PromptFile(path=path, prompts=prompts, blank_lines=[], sha256=sha256_bytes(data),
                      line_numbers=[], bom=data.startswith(BOM))
