"""The dev set's caption language: a strict template parser and a tolerant attribute extractor.

The 483 unique dev captions are generated from a handful of sentence templates filled with values (counts,
colours, locations, sizes, Paris classes, instruments, findings). Their typos are part of the templates and are
kept verbatim: "an an abnormality located", "lower-rigth" (only ever in the anatomical-landmark template),
items joined by a bare "and" ("polyp snareandtube"), "< 5mm".

- `parse_caption(text) -> CaptionAttributes` / `render_caption(attrs) -> text`: exact, render(parse(c)) == c for
  every dev caption; ValueError on text that matches no template.
- `extract_attributes(text)`: keyword extraction for ANY text (e.g. a GPT paraphrase). Two texts with equal
  extractions commit to the same numbers, sizes, colours, locations, instruments, findings (named or implied: a
  Paris class or a size implies a polyp), category nouns, procedure, Paris classes and negations, and use no term
  outside the caption vocabulary that the other lacks - the test a paraphrase must pass.
- `contradictions(captions)`: human-readable conflicts among one image's captions.
- `image_strata(captions)`: "procedure/main finding" label used to stratify the train/val split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------------ vocabulary

PROCEDURES = ("colonoscopy", "gastroscopy")
PATHOLOGIES = ("polyp", "oesophagitis", "ulcerative colitis", "barretts")  # what "findings" counts (abnormalities)
LANDMARKS = ("z-line", "cecum", "ileum", "pylorus")
INSTRUMENTS = ("biopsy forceps", "injection needle", "metal clip", "polyp snare", "tube")
ARTEFACTS = ("text", "green/black box artefact")
SIZES = ("<5mm", "5-10mm", "11-20mm", ">20mm")
PARIS = ("is", "ip", "iia", "iib", "iic", "iii")
LOCATIONS = ("center", "upper-left", "upper-right", "lower-left", "lower-right", "center-left", "center-right",
             "upper-center", "lower-center")
COUNT_NOUNS = ("finding", "instrument", "polyp")
LOCATED_SUBJECTS = ("abnormality", "anatomical landmark", "instrument")
COLOURS = ("black", "blue", "brown", "burgundy", "green", "grey", "orange", "pink", "purple", "red", "violet",
           "white", "yellow")

# How a contained item is written after "containing" (article included); everything else is bare.
_CONTAINED_PHRASE = {"polyp": "a polyp", "green/black box artefact": "a green/black box artefact",
                     "z-line": "the z-line", "cecum": "the cecum", "ileum": "the ileum", "pylorus": "the pylorus"}
_PHRASE_TO_ITEM = {v: k for k, v in _CONTAINED_PHRASE.items()}
_CONTAINABLE = set(PATHOLOGIES) | set(LANDMARKS) | set(INSTRUMENTS) | set(ARTEFACTS)
_SIZE_SPELLING = {"<5mm": "< 5mm"}  # the dev captions write "< 5mm" with a space
_SIZE_FROM_TEXT = {"< 5mm": "<5mm", "<5mm": "<5mm", "5-10mm": "5-10mm", "11-20mm": "11-20mm", ">20mm": ">20mm"}


@dataclass(frozen=True)
class CaptionAttributes:
    """What one templated caption says. Tuples keep the caption's own order (render needs it).

    template: template id (see TEMPLATES), e.g. "contains", "count", "located".
    findings: pathologies, landmarks and artefacts stated present ("polyp", "z-line", "text", ...).
    counts: (noun, n) for "with N polyps/findings/instruments".
    colours: colour phrases as written ("pink", "pale pink", "pink/red", the typo "ink").
    locations: canonical location names ("lower-right", also where the caption spells "lower-rigth").
    located: subject of a location caption ("abnormality" | "anatomical landmark" | "instrument").
    negations: what the caption says is absent ("polyp", "instrument", "finding", "text", "green/black box artefact").
    """

    template: str
    procedure: str | None = None
    findings: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()
    sizes: tuple[str, ...] = ()
    paris: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    located: str | None = None
    instruments: tuple[str, ...] = ()
    negations: tuple[str, ...] = ()
    extras: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # verbatim bits a template needs back


# ------------------------------------------------------------------------------------------------------ list syntax


def _split_list(s: str) -> list[str]:
    """'a, b and c' -> [a, b, c]; 'a and b' -> [a, b]; 'a' -> [a]."""
    if " and " not in s:
        return [s] if ", " not in s else s.split(", ")
    head, last = s.rsplit(" and ", 1)
    return head.split(", ") + [last]


def _join_list(items: tuple[str, ...] | list[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


# --------------------------------------------------------------------------------------------------------- templates
# Each template: (id, regex, builder from match -> attrs, renderer attrs -> text). Order matters only where two
# regexes could match the same text; they are written so that none do.

def _contains_items(blob: str) -> list[str] | None:
    """'polyp snareandtube' -> ['polyp snare', 'tube']; items are joined by a bare 'and' in the dev captions.
    Greedy left-to-right over known phrases, so an item containing 'and' could never be split wrongly."""
    phrases = sorted(set(_PHRASE_TO_ITEM) | (_CONTAINABLE - set(_CONTAINED_PHRASE)), key=len, reverse=True)
    out: list[str] = []
    rest = blob
    while rest:
        for ph in phrases:
            if rest.startswith(ph):
                out.append(_PHRASE_TO_ITEM.get(ph, ph))
                rest = rest[len(ph):]
                break
        else:
            return None
        if rest:
            if not rest.startswith("and"):
                return None
            rest = rest[3:]
    return out


def _b_contains(m: re.Match) -> CaptionAttributes | None:
    items = _contains_items(m["items"])
    if not items:
        return None
    return CaptionAttributes(
        template="contains",
        findings=tuple(i for i in items if i not in INSTRUMENTS),
        instruments=tuple(i for i in items if i in INSTRUMENTS),
        extras=(("order", "|".join(items)),),
    )


def _r_contains(a: CaptionAttributes) -> str:
    order = dict(a.extras).get("order")
    items = order.split("|") if order else list(a.findings) + list(a.instruments)
    return "Generate an image containing " + "and".join(_CONTAINED_PHRASE.get(i, i) for i in items) + "."


def _b_not_contains(m: re.Match) -> CaptionAttributes | None:
    item = _PHRASE_TO_ITEM.get(m["item"], m["item"])
    if item not in ARTEFACTS:
        return None
    return CaptionAttributes(template="not_contains", negations=(item,))


def _r_not_contains(a: CaptionAttributes) -> str:
    item = a.negations[0]
    return f"Generate an image not containing {_CONTAINED_PHRASE.get(item, item)}."


def _b_procedure(m: re.Match) -> CaptionAttributes:
    return CaptionAttributes(template="procedure", procedure=m["proc"])


def _r_procedure(a: CaptionAttributes) -> str:
    return f"Generate an image from a {a.procedure} procedure."


def _b_count(m: re.Match) -> CaptionAttributes | None:
    n, noun = int(m["n"]), m["noun"]
    if (n == 1) != (m["s"] == "") or n < 1:
        return None  # "1 polyps" / "2 polyp" are not template output
    findings = ("polyp",) if noun == "polyp" else ()
    return CaptionAttributes(template="count", counts=((noun, n),), findings=findings)


def _r_count(a: CaptionAttributes) -> str:
    noun, n = a.counts[0]
    return f"Generate an image with {n} {_plural(noun, n)}."


def _b_none(m: re.Match) -> CaptionAttributes:
    return CaptionAttributes(template="none", negations=(m["noun"],))


def _r_none(a: CaptionAttributes) -> str:
    return f"Generate an image with no {a.negations[0]}s."


def _sizes(blob: str) -> tuple[str, ...] | None:
    vals = _split_list(blob)
    if not all(v in _SIZE_FROM_TEXT for v in vals):
        return None
    return tuple(_SIZE_FROM_TEXT[v] for v in vals)


def _b_size(m: re.Match) -> CaptionAttributes | None:
    s = _sizes(m["size"])
    if s is None or len(s) != 1:
        return None
    return CaptionAttributes(template="polyp_size", findings=("polyp",), sizes=s)


def _r_size(a: CaptionAttributes) -> str:
    return f"Generate an image with a polyp of size {_SIZE_SPELLING.get(a.sizes[0], a.sizes[0])}."


def _b_sizes(m: re.Match) -> CaptionAttributes | None:
    s = _sizes(m["sizes"])
    if s is None or len(s) < 2:
        return None
    return CaptionAttributes(template="polyp_sizes", findings=("polyp",), sizes=s)


def _r_sizes(a: CaptionAttributes) -> str:
    return f"Generate an image with polyps of size {_join_list([_SIZE_SPELLING.get(s, s) for s in a.sizes])}."


def _b_paris(m: re.Match) -> CaptionAttributes | None:
    if m["p"] not in PARIS:
        return None
    return CaptionAttributes(template="paris", findings=("polyp",), paris=(m["p"],))


def _r_paris(a: CaptionAttributes) -> str:
    return f"Generate a polyp of type paris {a.paris[0]}."


def _b_paris_multi(m: re.Match) -> CaptionAttributes | None:
    parts = _split_list(m["list"])
    if len(parts) < 2 or not all(p.startswith("paris ") and p[6:] in PARIS for p in parts):
        return None
    return CaptionAttributes(template="paris_multi", findings=("polyp",), paris=tuple(p[6:] for p in parts))


def _r_paris_multi(a: CaptionAttributes) -> str:
    return f"Generate polyps of type {_join_list(['paris ' + p for p in a.paris])}."


def _colour_ok(c: str) -> bool:
    return bool(_colour_words(c))


def _b_colours(m: re.Match) -> CaptionAttributes | None:
    cols = _split_list(m["cols"])
    if (len(cols) == 1) != (m["s"] == "") or not all(_colour_ok(c) for c in cols):
        return None
    return CaptionAttributes(template="colours", colours=tuple(cols), located="abnormality")


def _r_colours(a: CaptionAttributes) -> str:
    s = "" if len(a.colours) == 1 else "s"
    return f"Generate an image with an abnormality with the color{s} {_join_list(a.colours)}."


def _b_colour_findings(m: re.Match) -> CaptionAttributes | None:
    c = m["col"]
    if c.lower() not in COLOURS:
        return None
    return CaptionAttributes(template="colour_findings", colours=(c.lower(),), extras=(("case", c),))


def _r_colour_findings(a: CaptionAttributes) -> str:
    return f"Generate an image with {dict(a.extras).get('case', a.colours[0].capitalize())} findings."


# The landmark template always spells lower-right as "lower-rigth"; the other two never do.
_LOCATION_SPELLING = {"anatomical landmark": {"lower-right": "lower-rigth"}}


def _b_located(m: re.Match) -> CaptionAttributes | None:
    subject = m["subject"]
    spelled = {v: k for k, v in _LOCATION_SPELLING.get(subject, {}).items()}
    locs = [spelled.get(x, x) for x in _split_list(m["locs"])]
    if not all(x in LOCATIONS for x in locs) or len(set(locs)) != len(locs):
        return None
    return CaptionAttributes(template="located", located=subject, locations=tuple(locs))


def _r_located(a: CaptionAttributes) -> str:
    spell = _LOCATION_SPELLING.get(a.located or "", {})
    return (f"Generate an image with an an {a.located} located in the "
            f"{_join_list([spell.get(x, x) for x in a.locations])}.")


TEMPLATES = [
    ("procedure", re.compile(r"Generate an image from a (?P<proc>colonoscopy|gastroscopy) procedure\."),
     _b_procedure, _r_procedure),
    ("not_contains", re.compile(r"Generate an image not containing (?P<item>.+)\."), _b_not_contains, _r_not_contains),
    ("contains", re.compile(r"Generate an image containing (?P<items>.+)\."), _b_contains, _r_contains),
    ("count", re.compile(r"Generate an image with (?P<n>[1-9][0-9]*) (?P<noun>finding|instrument|polyp)(?P<s>s?)\."),
     _b_count, _r_count),
    ("none", re.compile(r"Generate an image with no (?P<noun>finding|instrument|polyp)s\."), _b_none, _r_none),
    ("polyp_size", re.compile(r"Generate an image with a polyp of size (?P<size>.+)\."), _b_size, _r_size),
    ("polyp_sizes", re.compile(r"Generate an image with polyps of size (?P<sizes>.+)\."), _b_sizes, _r_sizes),
    ("paris", re.compile(r"Generate a polyp of type paris (?P<p>[a-z]+)\."), _b_paris, _r_paris),
    ("paris_multi", re.compile(r"Generate polyps of type (?P<list>.+)\."), _b_paris_multi, _r_paris_multi),
    ("colours", re.compile(r"Generate an image with an abnormality with the color(?P<s>s?) (?P<cols>.+)\."),
     _b_colours, _r_colours),
    ("colour_findings", re.compile(r"Generate an image with (?P<col>[A-Za-z]+) findings\."),
     _b_colour_findings, _r_colour_findings),
    ("located", re.compile(r"Generate an image with an an (?P<subject>abnormality|anatomical landmark|instrument) "
                           r"located in the (?P<locs>.+)\."), _b_located, _r_located),
]
_RENDER = {tid: r for tid, _, _, r in TEMPLATES}


def parse_caption(text: str) -> CaptionAttributes:
    """Parse one dev-style caption; ValueError if it matches no template exactly."""
    for _tid, rx, build, _render in TEMPLATES:
        m = rx.fullmatch(text)
        if m:
            attrs = build(m)
            if attrs is not None:
                return attrs
    raise ValueError(f"caption matches no known template: {text!r}")


def render_caption(attrs: CaptionAttributes) -> str:
    try:
        return _RENDER[attrs.template](attrs)
    except KeyError:
        raise ValueError(f"unknown template id {attrs.template!r}") from None


def try_parse(text: str) -> CaptionAttributes | None:
    try:
        return parse_caption(text)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------ tolerant extraction
# Works on lower-cased free text. Order: artefact phrases are removed first (their "green/black" is not an
# abnormality colour), then sizes (their digits are not counts), then negation scopes, then keywords.

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"single": "1", "sole": "1"})  # not "pair": "a pair of forceps" is one instrument

_BOX_RX = re.compile(r"(?:green\s*(?:/|-|and|or)\s*black|black\s*(?:/|-|and|or)\s*green)\s+(?:box|square|rectangle)"
                     r"(?:\s+artefacts?|\s+artifacts?)?|\bbox\s+artefacts?|\bbox\s+artifacts?")
_GLUED_AND_RX = re.compile(r"(polyp|forceps|snare|clip|tube|needle|oesophagitis|colitis)and(?=[a-z])")
_TEXT_RX = re.compile(r"\b(?:text|texts|textual|writing|lettering|caption overlay|text overlay)\b")
_MM = r"\s*(?:mm|millimet(?:er|re)s?)\b"
_SIZE_RXS = [
    (re.compile(r"(?:<|less\s+than|smaller\s+than|under|below)\s*5" + _MM), "<5mm"),
    (re.compile(r"\b5\s*(?:-|–|to)\s*10" + _MM), "5-10mm"),
    (re.compile(r"\b11\s*(?:-|–|to)\s*20" + _MM), "11-20mm"),
    (re.compile(r"(?:>|greater\s+than|more\s+than|larger\s+than|bigger\s+than|over|above|exceeding)\s*20" + _MM),
     ">20mm"),
]
_GENERIC_SIZE_RX = re.compile(r"(?P<op>[<>])?\s*(?P<a>\d+)(?:\s*(?:-|–|to)\s*(?P<b>\d+))?" + _MM)
_PARIS_RX = re.compile(r"\bparis\s+(?:types?\s+|class(?:es)?\s+|classifications?\s+)?"
                       r"((?:0-)?(?:iia|iib|iic|iii|is|ip)\b(?:\s*(?:,|and|or|&|/)\s*(?:paris\s+)?(?:0-)?"
                       r"(?:iia|iib|iic|iii|is|ip)\b)*)")
_PROC_RX = re.compile(r"\b(colonoscop\w*|gastroscop\w*)")
_NEG_RX = re.compile(r"\b(?:no|without|not\s+(?:containing|contain|showing|show|including|include|having|have|"
                     r"with|any)|free\s+(?:of|from)|absence\s+of|absent|lacking|lacks|devoid\s+of|excluding|"
                     r"zero|none\s+of|(?:does|do|doesn't|don't)\s+(?:not\s+)?(?:contain|show|include|have|feature))\b")
_NEG_WINDOW = 6  # words after a negation cue that it governs

# keyword -> (attribute, canonical value)
_KEYWORDS: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"\bbiopsy\s+forceps\b|\bforceps\b"), "instruments", "biopsy forceps"),
    (re.compile(r"\binjection\s+needles?\b|\bneedles?\b"), "instruments", "injection needle"),
    (re.compile(r"\bmetal(?:lic)?\s+clips?\b|\bclips?\b"), "instruments", "metal clip"),
    (re.compile(r"\bpolyp\s+snares?\b|\bsnares?\b"), "instruments", "polyp snare"),
    (re.compile(r"\btubes?\b"), "instruments", "tube"),
    (re.compile(r"\bpolyps?\b|\bpolypoid\b"), "findings", "polyp"),
    (re.compile(r"\b(?:o?esophagitis)"), "findings", "oesophagitis"),
    (re.compile(r"\bulcerative\s+colitis\b|\bcolitis\b"), "findings", "ulcerative colitis"),
    (re.compile(r"\bbarrett'?s?(?:\s+o?esophagus)?\b"), "findings", "barretts"),
    (re.compile(r"\bz[\s-]?line\b"), "findings", "z-line"),
    (re.compile(r"\bc(?:a)?ecum\b"), "findings", "cecum"),
    (re.compile(r"\bileum\b"), "findings", "ileum"),
    (re.compile(r"\bpylorus\b"), "findings", "pylorus"),
]
# Category nouns a negation can govern (what "no X" denies).
_NEGATABLE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\bpolyps?\b"), "polyp"),
    (re.compile(r"\binstruments?\b|\btools?\b|\bdevices?\b"), "instrument"),
    (re.compile(r"\bfindings?\b|\babnormalit(?:y|ies)\b|\blesions?\b|\bpatholog(?:y|ies)\b"), "finding"),
    (re.compile(r"\x00text\x00"), "text"),
    (re.compile(r"\x00box\x00"), "green/black box artefact"),
]
_COLOUR_RX = re.compile(r"\b(" + "|".join(COLOURS + ("gray", "ink", "pinkish", "reddish", "whitish", "yellowish",
                                                     "brownish")) + r")\b")
_COLOUR_ALIAS = {"gray": "grey", "ink": "pink", "pinkish": "pink", "reddish": "red", "whitish": "white",
                 "yellowish": "yellow", "brownish": "brown"}
_V = {"upper": "upper", "top": "upper", "lower": "lower", "bottom": "lower", "center": "center", "centre": "center",
      "central": "center", "middle": "center", "mid": "center"}
_H = {"left": "left", "right": "right", "rigth": "right", "center": "center", "centre": "center",
      "middle": "center", "central": "center"}
_LOC_PAIR_RX = re.compile(r"\b(upper|top|lower|bottom|center|centre|central|middle|mid)[\s-]+"
                          r"(left|right|rigth|center|centre|middle|central)\b")
_LOC_SIDE_RX = re.compile(r"\b(left|right|rigth)[\s-]+(upper|top|lower|bottom|center|centre|middle)\b")
_LOC_CENTER_RX = re.compile(r"\b(center|centre|central|middle)\b")


# Category nouns: what a text commits to when it names no specific item ("an abnormality", "2 instruments"). A
# specific item in place of a category, or a category added to specific items, is a change.
_GENERIC: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\b(?:findings?|abnormal(?:it(?:y|ies))?|lesions?|anomal(?:y|ies|ous)|patholog(?:y|ies|ical))\b"),
     "finding"),
    (re.compile(r"\blandmarks?\b"), "landmark"),
    (re.compile(r"\b(?:instruments?|tools?|devices?|equipment)\b"), "instrument"),
]

# Words a paraphrase may use besides the caption vocabulary above (findings, instruments, landmarks, artefacts,
# procedures, sizes, Paris classes, colours, locations, numbers, negation cues): function words and the plain
# words of asking for / describing an image. Deliberately closed: any other word (a finding outside the
# vocabulary such as "ulcer" or "bleeding", an organ, a morphology such as "sessile", a vague size such as
# "large") is an unknown term, and a paraphrase with unknown terms its original lacks is rejected. A rejected
# good paraphrase costs a little yield; an accepted wrong one teaches the model a wrong caption.
_PLAIN_WORDS = frozenset("""
a an the this that these those it its itself there here their they them which what who whose where when while
as at by for from in into inside onto on upon of off out over under within throughout through across along among
around about above below beneath near next beside besides between toward towards via per to with and or but nor
so yet also too very quite rather just only even both either neither each every any some all such same other
another several many much more most multiple various numerous few is are was were be been being am has have had
having do does did done doing can could may might must shall should will would let please i me my we us our you
your if whether because since though although how not no none nothing without free absence absent lacking lack
devoid excluding exclude zero doesn don isn aren wasn weren won wouldn shouldn t s ll ve d re
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen
eighteen nineteen twenty single sole exactly precisely total totally number count altogether overall least
generate create produce make render draw depict show display illustrate portray present provide give capture
visualize visualise synthesize synthesise simulate output craft compose construct represent reproduce picture
imagine feature highlight include contain exhibit reveal demonstrate see view visible appear observe detect
identify find locate position place situate sit lie occupy take obtain acquire record look want need require
ensure keep use like clearly contains containing presence present shown seen displayed featuring incorporate
overlay
image picture photo photograph frame snapshot shot scene visual visualization visualisation rendering
illustration depiction representation example sample still figure field area region part portion section zone
quadrant corner side edge border half middle center centre central top bottom left right upper lower mid
location position spot site patch point surface background foreground perspective angle orientation
rigth endoscopy endoscopic endoscope camera scope examination exam procedure medical clinical diagnostic
inspection imaging study patient mucosa mucosal tissue lining wall lumen interior internal inner gastrointestinal
digestive tract gi during taken captured acquired obtained
realistic realistically real natural naturally clear sharp detailed detail high quality resolution lighting lit
bright illuminated synthetic artificial typical typically standard clean crisp accurate accurately lifelike
photorealistic authentic vivid focused well good proper properly correct correctly exact
color colour coloration colouration hue shade tone tint tinted tinge pale dark light deep mixed combination
abnormality abnormalities abnormal finding findings lesion lesions anomaly anomalies landmark anatomical
instrument tool device equipment feature type class classification classified
category categorized categorised morphology according paris size sized measuring measure measurement diameter
approximately roughly range ranging mm millimeter millimetre generated image created produced rendered
""".split())


def _stems(w: str) -> tuple[str, ...]:
    """The word and its plausible bases (plural, past, -ing, -ly), for the plain-word check only."""
    out = [w]
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"),
                         ("ly", "")):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            out.append(w[: -len(suffix)] + repl)
    return tuple(out)


def _unknown_terms(t: str) -> set[str]:
    """Words of `t` (lower case, sizes and Paris classes already cut out) outside the caption vocabulary and
    _PLAIN_WORDS. Vocabulary phrases are removed whole first, so a part of one ("ulcerative", "biopsy",
    "injection") standing alone is unknown."""
    t = t.replace("\x00box\x00", " ").replace("\x00text\x00", " ")
    t = _PROC_RX.sub(" ", t)
    for rx, _attr, _val in _KEYWORDS:
        t = rx.sub(" ", t)
    for rx, _cat in _NEGATABLE:
        t = rx.sub(" ", t)
    t = _COLOUR_RX.sub(" ", t)
    t = _NEG_RX.sub(" ", t)
    unknown = set()
    for w in re.findall(r"[^\W\d_]+", t):  # any script: a non-Latin word or a look-alike letter is unknown too
        if not any(x in _PLAIN_WORDS for x in _stems(w)) and w not in _COLOUR_ALIAS:
            unknown.add(w)
    return unknown


def _colour_words(phrase: str) -> set[str]:
    return {_COLOUR_ALIAS.get(w, w) for w in _COLOUR_RX.findall(phrase.lower())}


def _location(v: str, h: str) -> str | None:
    vv, hh = _V[v], _H[h]
    if vv == "center" and hh == "center":
        return "center"
    return f"{vv}-{hh}"


ATTRIBUTES = ("procedure", "numbers", "sizes", "paris", "colours", "locations", "instruments", "findings", "generic",
              "negations", "unknown_terms")


def extract_attributes(text: str) -> dict[str, frozenset[str]]:
    """Attribute values a caption (or any paraphrase of one) commits to; every key of ATTRIBUTES is present.

    findings holds the findings named and those implied: a Paris class or a size implies a polyp (the only finding
    the captions classify or measure). generic holds the category nouns said instead of an item ("finding" for an
    abnormality/lesion, "landmark", "instrument"). unknown_terms holds every word outside the caption vocabulary
    and the plain words a paraphrase needs (see _PLAIN_WORDS): "ulcer", "bleeding", organs, morphologies."""
    t = " " + text.lower().replace("’", "'") + " "
    out: dict[str, set[str]] = {k: set() for k in ATTRIBUTES}
    # Artefacts become sentinel tokens so their words cannot be read as colours/instruments, but negations still
    # see them.
    t = _GLUED_AND_RX.sub(r"\1 and ", t)  # the dev captions' "polyp snareandtube"
    t = _BOX_RX.sub(" \x00box\x00 ", t)
    t = _TEXT_RX.sub(" \x00text\x00 ", t)
    for rx, val in _SIZE_RXS:
        if rx.search(t):
            out["sizes"].add(val)
            t = rx.sub(" ", t)
    for m in _GENERIC_SIZE_RX.finditer(t):  # a size outside the dev vocabulary is still a commitment
        out["sizes"].add(f"{m['op'] or ''}{m['a']}{'-' + m['b'] if m['b'] else ''}mm")
    t = _GENERIC_SIZE_RX.sub(" ", t)
    if out["sizes"]:
        out["findings"].add("polyp")  # only polyps are measured in this vocabulary
    for m in _PARIS_RX.finditer(t):
        out["paris"].update(re.findall(r"\b(?:0-)?(iia|iib|iic|iii|is|ip)\b", m.group(1)))
        out["findings"].add("polyp")
    t = _PARIS_RX.sub(" ", t)
    out["unknown_terms"].update(_unknown_terms(t))
    for m in _PROC_RX.finditer(t):
        out["procedure"].add("colonoscopy" if m.group(1).startswith("colon") else "gastroscopy")

    # Negation scopes: the next few words after a cue. Keywords inside a scope are negated, not present.
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", t)]
    scopes: list[tuple[int, int]] = []
    for m in _NEG_RX.finditer(t):
        following = [w for w in words if w[0] >= m.end()][:_NEG_WINDOW]
        end = following[-1][1] if following else m.end()
        # a scope ends at a clause boundary
        stop = re.search(r"[.;,]|\bbut\b|\bwhile\b|\bwith\b(?!\s+(?:any|a|an)\b)", t[m.end():end])
        scopes.append((m.end(), m.end() + stop.start() if stop else end))

    for a, b in scopes:
        span = t[a:b]
        # A named item inside a negation scope is a negated item ("no instruments and oesophagitis" must not lose
        # the oesophagitis); items first, longest phrases first, so "polyp snare" does not also read as "polyp".
        for rx, _attr, val in _KEYWORDS:
            if rx.search(span):
                out["negations"].add(val)
                span = rx.sub(" ", span)
        for rx, cat in _NEGATABLE:
            if rx.search(span):
                out["negations"].add(cat)
    t_pos = t
    for a, b in scopes:  # blank out negated spans for the positive keyword pass
        t_pos = t_pos[:a] + " " * (b - a) + t_pos[b:]

    for rx, attr, val in _KEYWORDS:  # consumed in order: "polyp snare" must not also read as "polyp"
        if rx.search(t_pos):
            out[attr].add(val)
            t_pos = rx.sub(" ", t_pos)
    for rx, cat in _GENERIC:
        if rx.search(t_pos):
            out["generic"].add(cat)
    if "\x00text\x00" in t_pos:
        out["findings"].add("text")
    if "\x00box\x00" in t_pos:
        out["findings"].add("green/black box artefact")

    for w in re.findall(r"\b(\d+)\b", t_pos):
        out["numbers"].add(str(int(w)))
    for w in re.findall(r"\b([a-z]+)\b", t_pos):
        if w in _NUMBER_WORDS and w != "zero":
            out["numbers"].add(_NUMBER_WORDS[w])
    for c in _colour_words(t_pos):
        out["colours"].add(c)

    spans = []
    for m in _LOC_PAIR_RX.finditer(t_pos):
        loc = _location(m.group(1), m.group(2))
        if loc:
            out["locations"].add(loc)
            spans.append((m.start(), m.end()))
    for m in _LOC_SIDE_RX.finditer(t_pos):
        loc = _location(m.group(2), m.group(1))
        if loc:
            out["locations"].add(loc)
            spans.append((m.start(), m.end()))
    for m in _LOC_CENTER_RX.finditer(t_pos):
        if not any(a <= m.start() < b for a, b in spans):
            out["locations"].add("center")
    return {k: frozenset(v) for k, v in out.items()}


def attributes_of(attrs: CaptionAttributes) -> dict[str, frozenset[str]]:
    """The extract_attributes()-shaped view of a parsed caption (what it commits to), for cross-checking."""
    out: dict[str, set[str]] = {k: set() for k in ATTRIBUTES}
    if attrs.procedure:
        out["procedure"].add(attrs.procedure)
    out["numbers"].update(str(n) for _, n in attrs.counts)
    out["sizes"].update(attrs.sizes)
    out["paris"].update(attrs.paris)
    for c in attrs.colours:
        out["colours"].update(_colour_words(c))
    out["locations"].update(attrs.locations)
    out["instruments"].update(attrs.instruments)
    out["findings"].update(attrs.findings)
    if attrs.located is not None:  # "an abnormality ..." / "an anatomical landmark ..." / "an instrument ..."
        out["generic"].add({"abnormality": "finding", "anatomical landmark": "landmark"}.get(attrs.located,
                                                                                              attrs.located))
    out["generic"].update(noun for noun, _ in attrs.counts if noun != "polyp")
    if attrs.template == "colour_findings":
        out["generic"].add("finding")
    out["negations"].update(attrs.negations)
    return {k: frozenset(v) for k, v in out.items()}


def attribute_differences(original: str, paraphrase: str) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """{attribute: (only in original, only in paraphrase)} for attributes that differ; empty = preserved."""
    a, b = extract_attributes(original), extract_attributes(paraphrase)
    return {k: (a[k] - b[k], b[k] - a[k]) for k in a if a[k] != b[k]}


# ---------------------------------------------------------------------------------------------- contradictions


def _claims(captions: list[str]) -> list[tuple[str, CaptionAttributes]]:
    out = []
    for c in captions:
        a = try_parse(c)
        if a is not None:
            out.append((c, a))
    return out


def _asserts_polyp(a: CaptionAttributes) -> bool:
    return "polyp" in a.findings or any(n == "polyp" for n, _ in a.counts)


def _asserts_instrument(a: CaptionAttributes) -> bool:
    return bool(a.instruments) or a.located == "instrument" and a.template == "located" \
        or any(n == "instrument" for n, _ in a.counts)


def _asserts_finding(a: CaptionAttributes) -> bool:
    # Landmarks, artefacts and instruments are not findings in this data (e.g. 269 images say both "no findings"
    # and "an instrument located ..."), so only pathologies, abnormality captions and finding counts count.
    return (any(f in PATHOLOGIES for f in a.findings) or (a.located == "abnormality")
            or any(n in ("finding", "polyp") for n, _ in a.counts) or a.template == "colour_findings")


_RULES = [
    ("instrument", "no instruments", _asserts_instrument),
    ("polyp", "no polyps", _asserts_polyp),
    ("finding", "no findings", _asserts_finding),
]


def contradictions(captions: list[str]) -> list[str]:
    """Human-readable conflicts among one image's captions (captions matching no template are ignored)."""
    claims = _claims(captions)
    out: list[str] = []
    for noun, label, asserts in _RULES:
        if any(noun in a.negations and a.template == "none" for _, a in claims):
            hits = [c for c, a in claims if asserts(a)]
            if hits:
                out.append(f'"{label}" vs ' + "; ".join(f'"{h}"' for h in hits))
    for art in ARTEFACTS:
        if any(art in a.negations for _, a in claims) and any(art in a.findings for _, a in claims):
            out.append(f'"not containing {_CONTAINED_PHRASE.get(art, art)}" vs "containing '
                       f'{_CONTAINED_PHRASE.get(art, art)}"')
    procs = sorted({a.procedure for _, a in claims if a.procedure})
    if len(procs) > 1:
        out.append("both " + " and ".join(procs) + " procedure")
    counts: dict[str, set[int]] = {}
    for _, a in claims:
        for noun, n in a.counts:
            counts.setdefault(noun, set()).add(n)
    for noun, ns in sorted(counts.items()):
        if len(ns) > 1:
            out.append(f"different {noun} counts: " + ", ".join(str(n) for n in sorted(ns)))
    return out


# --------------------------------------------------------------------------------------------------------- strata

# Priority when an image has several: the rarer / more specific finding wins, so rare strata are not swallowed.
_STRATA_PRIORITY = ("barretts", "oesophagitis", "ulcerative colitis", "polyp")


def image_strata(captions: list[str]) -> str:
    """'<procedure>/<main finding>' for stratifying the split, e.g. 'colonoscopy/polyp', 'gastroscopy/landmark',
    'colonoscopy/instrument', 'colonoscopy/none'. A positive claim wins over a contradicting negation ("no polyps"
    beside "a polyp of size 11-20mm"): the specific captions carry more evidence than the blanket one."""
    claims = [a for _, a in _claims(captions)]
    procs = sorted({a.procedure for a in claims if a.procedure})
    procedure = procs[0] if len(procs) == 1 else ("mixed" if procs else "unknown")
    found = {f for a in claims for f in a.findings}
    found |= {"polyp" for a in claims if any(n == "polyp" for n, _ in a.counts)}
    for f in _STRATA_PRIORITY:
        if f in found:
            return f"{procedure}/{f.replace(' ', '-')}"
    if found & set(LANDMARKS):
        return f"{procedure}/landmark"
    if any(a.instruments or a.located == "instrument" for a in claims):
        return f"{procedure}/instrument"
    return f"{procedure}/none"
