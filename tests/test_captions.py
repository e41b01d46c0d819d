"""The caption grammar over all 483 dev captions, the tolerant extractor, contradictions and strata."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.captions import (
    CaptionAttributes,
    attribute_differences,
    attributes_of,
    contradictions,
    extract_attributes,
    image_strata,
    parse_caption,
    render_caption,
)
from harness.prompts import shipped_dev_captions

CAPTIONS = shipped_dev_captions()


def test_shipped_list_is_the_483_dev_captions(dev_dir):
    from harness.data import load_devset

    assert len(CAPTIONS) == len(set(CAPTIONS)) == 483
    assert CAPTIONS == load_devset(dev_dir).unique_prompts()


def test_every_dev_caption_parses_and_round_trips():
    templates = Counter()
    for c in CAPTIONS:
        a = parse_caption(c)
        templates[a.template] += 1
        assert render_caption(a) == c
    assert set(templates) == {"located", "colours", "contains", "count", "polyp_sizes", "polyp_size", "paris",
                              "none", "paris_multi", "not_contains", "procedure", "colour_findings"}
    assert templates["located"] == 319 and templates["colours"] == 99


def test_extractor_agrees_with_parser_on_every_dev_caption():
    """The tolerant extractor and the strict grammar read the same commitments from each caption."""
    for c in CAPTIONS:
        assert extract_attributes(c) == attributes_of(parse_caption(c)), c


def test_parsed_values_and_typos():
    a = parse_caption("Generate an image with an an anatomical landmark located in the center, upper-center and "
                      "lower-rigth.")
    assert a.located == "anatomical landmark" and a.locations == ("center", "upper-center", "lower-right")
    assert render_caption(a).endswith("lower-rigth.")  # the typo belongs to the landmark template
    a = parse_caption("Generate an image containing polyp snareandtube.")
    assert a.instruments == ("polyp snare", "tube") and a.findings == ()
    a = parse_caption("Generate an image with polyps of size < 5mm, 5-10mm and 11-20mm.")
    assert a.sizes == ("<5mm", "5-10mm", "11-20mm") and a.findings == ("polyp",)
    a = parse_caption("Generate polyps of type paris is and paris iia.")
    assert a.paris == ("is", "iia")
    a = parse_caption("Generate an image with 16 polyps.")
    assert a.counts == (("polyp", 16),)
    a = parse_caption("Generate an image with an abnormality with the colors ink, white and brown.")
    assert a.colours == ("ink", "white", "brown")  # verbatim phrase; the extractor reads "ink" as pink
    assert extract_attributes(render_caption(a))["colours"] == {"pink", "white", "brown"}
    assert parse_caption("Generate an image with no instruments.").negations == ("instrument",)
    assert parse_caption("Generate an image from a gastroscopy procedure.").procedure == "gastroscopy"


def test_rendering_new_values_follows_the_templates():
    a = CaptionAttributes(template="count", counts=(("instrument", 2),))
    assert render_caption(a) == "Generate an image with 2 instruments."
    a = CaptionAttributes(template="located", located="instrument", locations=("lower-right", "center"))
    assert render_caption(a) == "Generate an image with an an instrument located in the lower-right and center."
    assert parse_caption(render_caption(a)) == a


@pytest.mark.parametrize("text", [
    "Generate an image with 1 polyps.",  # template never pluralises a count of 1
    "Generate an image with an abnormality with the color pink and red.",  # singular with a list
    "Generate an image containing a unicorn.",
    "Generate an image with an an abnormality located in the far-left.",
    "generate an image containing a polyp.",  # case matters: the test prompts are verbatim dev captions
    "Create an image containing a polyp.",
    "",
])
def test_non_template_text_is_rejected(text):
    with pytest.raises(ValueError, match="no known template"):
        parse_caption(text)


PRESERVING = [
    ("Generate an image with 2 polyps.", "Create a picture showing two polyps."),
    ("Generate an image with no instruments.", "Produce an image without any instruments."),
    ("Generate an image with an an abnormality located in the center, upper-left and lower-right.",
     "Create an image where an abnormality sits in the centre, the upper left and the bottom right."),
    ("Generate an image with a polyp of size < 5mm.", "Create an image of a polyp smaller than 5 mm."),
    ("Generate an image with a polyp of size >20mm.", "Show a polyp larger than 20 millimeters."),
    ("Generate an image with polyps of size 5-10mm and 11-20mm.", "Polyps measuring 5 to 10 mm and 11-20 mm."),
    ("Generate an image not containing a green/black box artefact.", "An image free of the green and black box artifact."),
    ("Generate an image with an abnormality with the colors pink, red and white.",
     "An image with an abnormality coloured pink, red, and white."),
    ("Generate polyps of type paris is and paris iia.", "Generate polyps of Paris types Is and IIa."),
    ("Generate an image from a colonoscopy procedure.", "Create a colonoscopic image."),
    ("Generate an image not containing text.", "Generate an image that does not contain any text."),
    ("Generate an image containing biopsy forcepsandtube.", "An image showing biopsy forceps and a tube."),
]

CHANGING = [
    ("Generate an image with 2 polyps.", "Create a picture showing three polyps.", "numbers"),
    ("Generate an image with no instruments.", "An image with an instrument.", "negations"),
    ("Generate an image with an an abnormality located in the upper-left.", "An abnormality in the upper right.",
     "locations"),
    ("Generate an image with a polyp of size < 5mm.", "A polyp of 5-10 mm.", "sizes"),
    ("Generate an image with an abnormality with the colors pink and red.", "A pink and white abnormality.", "colours"),
    ("Generate an image containing a green/black box artefact.", "An image without the green/black box.",
     "findings"),
    ("Generate an image from a colonoscopy procedure.", "An image from a gastroscopy.", "procedure"),
    ("Generate a polyp of type paris ip.", "Generate a polyp of type paris is.", "paris"),
    ("Generate an image containing polyp snare.", "An image containing biopsy forceps.", "instruments"),
]


@pytest.mark.parametrize("original,paraphrase", PRESERVING)
def test_paraphrases_that_keep_every_attribute(original, paraphrase):
    assert attribute_differences(original, paraphrase) == {}


@pytest.mark.parametrize("original,paraphrase,attr", CHANGING)
def test_paraphrases_that_change_an_attribute(original, paraphrase, attr):
    assert attr in attribute_differences(original, paraphrase)


def test_box_colours_are_not_abnormality_colours():
    e = extract_attributes("Generate an image containing a green/black box artefact.")
    assert e["colours"] == frozenset() and e["findings"] == {"green/black box artefact"}


def test_contradictions():
    ok = ["Generate an image with no instruments.", "Generate an image containing a polyp.",
          "Generate an image with 1 polyp.", "Generate an image with an an abnormality located in the center."]
    assert contradictions(ok) == []
    c = contradictions(ok + ["Generate an image with an an instrument located in the lower-right."])
    assert c == ['"no instruments" vs "Generate an image with an an instrument located in the lower-right."']
    c = contradictions(["Generate an image with no polyps.", "Generate an image with 2 polyps.",
                        "Generate an image with no findings.", "Generate an image not containing text.",
                        "Generate an image containing text.", "Generate an image from a colonoscopy procedure.",
                        "Generate an image from a gastroscopy procedure.", "Generate an image with 1 polyp."])
    assert any(x.startswith('"no polyps" vs') and "2 polyps" in x for x in c)
    assert any(x.startswith('"no findings" vs') for x in c)
    assert '"not containing text" vs "containing text"' in c
    assert "both colonoscopy and gastroscopy procedure" in c
    assert "different polyp counts: 1, 2" in c
    # "no findings" beside an instrument is NOT a contradiction in this data (instruments are not findings)
    assert contradictions(["Generate an image with no findings.", "Generate an image containing tube."]) == []


def test_contradictions_in_the_real_dev_set(dev_dir):
    """The 18 images that say "no instruments" and "an instrument located ..." are all found (plus one that says
    "no instruments" and "containing polyp snare")."""
    from harness.data import load_devset

    by = load_devset(dev_dir).captions_by_image()
    located = {f for f, caps in by.items() if "Generate an image with no instruments." in caps
               and any("an an instrument located" in c for c in caps)}
    assert len(located) == 18
    flagged = {f for f, caps in by.items() if any(x.startswith('"no instruments"') for x in contradictions(caps))}
    assert located <= flagged and len(flagged) == 19
    (extra,) = flagged - located
    assert "Generate an image containing polyp snare." in by[extra]


def test_image_strata():
    assert image_strata(["Generate an image from a colonoscopy procedure.",
                         "Generate an image containing a polyp."]) == "colonoscopy/polyp"
    assert image_strata(["Generate an image from a gastroscopy procedure.", "Generate an image containing the z-line.",
                         "Generate an image containing oesophagitis."]) == "gastroscopy/oesophagitis"
    assert image_strata(["Generate an image from a colonoscopy procedure.",
                         "Generate an image containing tube."]) == "colonoscopy/instrument"
    assert image_strata(["Generate an image containing text."]) == "unknown/none"


# ------------------------------------------------------------------------------- adversarial paraphrase screen
# Built from the vocabulary itself, so every finding, landmark, artefact and instrument the captions know is swapped
# in for every other, added, and implied; terms outside the vocabulary are rejected, whatever they are.

from harness.captions import ARTEFACTS, INSTRUMENTS, LANDMARKS, PATHOLOGIES  # noqa: E402

ITEMS = PATHOLOGIES + LANDMARKS + ARTEFACTS + INSTRUMENTS
SURFACE = {"polyp": "a polyp", "z-line": "the z-line", "cecum": "the cecum", "ileum": "the ileum",
           "pylorus": "the pylorus", "green/black box artefact": "a green/black box artefact"}
# Findings, morphologies, organs and objects outside the vocabulary (what an adversary or a chatty model adds).
OUTSIDE = ("ulcer", "bleeding", "blood", "tumour", "tumor", "cancer", "carcinoma", "adenoma", "hemorrhoids",
           "haemorrhoid", "varices", "diverticulum", "angiectasia", "erosion", "inflammation", "stricture",
           "crohn's disease", "gastritis", "lymphoma", "mass", "growth", "stool", "dysplasia", "sessile polyp",
           "pedunculated polyp", "flat polyp", "large polyp", "foreign body", "hemoclip", "stent", "colon",
           "stomach", "ulcerative lesion", "biopsy site", "injection site", "watermark")


def _say(item: str) -> str:
    return SURFACE.get(item, item)


def _rejected(original: str, paraphrase: str) -> dict:
    diff = attribute_differences(original, paraphrase)
    assert diff, f"{paraphrase!r} passed as a paraphrase of {original!r}"
    return diff


def test_the_issue_examples_are_rejected():
    assert "unknown_terms" in _rejected("Generate a polyp of type paris is.", "Generate a ulcer of type paris is.")
    assert _rejected("Generate a polyp of type paris is.", "Generate a polyp of type paris is and bleeding.")
    assert _rejected("Generate an image with 2 polyps.", "Generate an image with 2 polyps and bleeding.")


def test_every_item_swapped_for_every_other_is_rejected():
    for old in ITEMS:
        original = f"Generate an image containing {_say(old)}."
        for new in ITEMS + OUTSIDE:
            if new != old:
                _rejected(original, f"Generate an image containing {_say(new)}.")


@pytest.mark.parametrize("frame", ["Generate a {} of type paris is.", "Generate an image with a {} of size 5-10mm.",
                                   "Generate {} of type paris iia.", "Show a Paris Ip {}."])
def test_a_polyp_implied_by_a_paris_class_or_size_cannot_be_swapped(frame):
    original = frame.format("polyp")
    for new in ITEMS + OUTSIDE + ("lesion", "abnormality", "finding", "instrument"):
        if new != "polyp":
            _rejected(original, frame.format(new))


def test_an_added_item_or_outside_term_is_rejected_for_every_template():
    originals = {}
    for c in CAPTIONS:
        originals.setdefault(parse_caption(c).template, []).append(c)
    for template, caps in sorted(originals.items()):
        for original in caps[:2]:
            a = parse_caption(original)
            named = set(a.findings) | set(a.instruments) | set(a.negations)  # "no polyps and a polyp" is moot
            for new in ITEMS + OUTSIDE:
                if new not in named:
                    _rejected(original, original[:-1] + f" and {_say(new)}.")
                    _rejected(original, f"{original[:-1]}, showing {_say(new)}.")


@pytest.mark.parametrize("original,paraphrase", [
    # a finding implied where the original names none, or only a category
    ("Generate an image with 1 finding.", "Generate an image with 1 finding of type paris iia."),
    ("Generate an image with an abnormality with the color pink.", "Generate a pink polyp."),
    ("Generate an image with an abnormality with the color pink.", "Show a pink abnormality measuring 5-10 mm."),
    ("Generate an image with an an abnormality located in the center.", "Show a Paris IIa lesion in the center."),
    ("Generate an image with an an anatomical landmark located in the center.", "Show the pylorus in the center."),
    ("Generate an image with an an instrument located in the center.", "Show biopsy forceps in the center."),
    ("Generate an image with Red findings.", "Show red oesophagitis."),
    # a specific finding replaced by its category, or a category added to it
    ("Generate a polyp of type paris is.", "Generate a lesion of type paris is."),
    ("Generate an image with 2 polyps.", "Generate an image with 2 polyps and a lesion."),
    ("Generate an image containing a metal clip.", "Show a metal clip and another tool."),
    # negated items swapped
    ("Generate an image with no polyps.", "Generate an image with no ulcers."),
    ("Generate an image with no polyps.", "Generate an image with no polyps, only a bleeding ulcer."),
    ("Generate an image not containing text.", "Generate an image not containing a watermark."),
    # other scripts and look-alike letters (a Cyrillic "о" in "polyp") are not the vocabulary's words
    ("Generate a polyp of type paris is.", "Generate a язва of type paris is."),
    ("Generate an image containing a polyp.", "Generate an image containing a p\u043elyp."),
    ("Generate an image with 2 polyps.", "Generate an image with 2 polyps and an ÜLCER."),
    # a vocabulary word cut out of its phrase is not that phrase
    ("Generate an image containing a polyp.", "Generate an image containing an ulcerative polyp."),
    ("Generate an image containing tube.", "Generate an image containing tube at an injection site."),
    ("Generate an image containing barretts.", "Show Barrett's oesophagus with dysplasia."),
])
def test_implied_category_negated_and_partial_phrase_changes_are_rejected(original, paraphrase):
    _rejected(original, paraphrase)


LEGITIMATE = [
    ("Generate a polyp of type paris is.", "Render a polyp classified as Paris type Is."),
    ("Generate a polyp of type paris iia.", "Create an image of a polyp of Paris classification 0-IIa."),
    ("Generate an image with a polyp of size 11-20mm.", "Depict a polyp with a size of 11-20mm."),
    ("Generate an image with 2 polyps.", "Render an endoscopic view with 2 polyps visible."),
    ("Generate an image with an an abnormality located in the upper-left.",
     "Depict an anomaly situated in the top-left area of the image."),
    ("Generate an image with an abnormality with the color pink.", "Show an abnormality that is pink in colour."),
    ("Generate an image with 1 instrument.", "Depict exactly one tool in the image."),
    ("Generate an image containing the z-line.", "Create a picture in which the Z-line is visible."),
    ("Generate an image containing barretts.", "Show Barrett's esophagus."),
    ("Generate an image with no polyps.", "Create an image that does not contain any polyps."),
    ("Generate an image from a colonoscopy procedure.", "Show a view taken during a colonoscopic examination."),
    ("Generate an image not containing a green/black box artefact.",
     "Produce an image free of any green and black box artifact."),
    ("Generate an image containing oesophagitis.", "Show esophagitis in a realistic endoscopic frame."),
]


@pytest.mark.parametrize("original,paraphrase", LEGITIMATE)
def test_legitimate_paraphrases_still_pass(original, paraphrase):
    assert attribute_differences(original, paraphrase) == {}


def test_identity_and_plain_rewordings_of_every_real_dev_caption_pass(dev_dir):
    """On the real dev CSV: each unique caption against itself, and against the fake server's rewordings."""
    import sys
    from pathlib import Path

    from harness.data import load_devset

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import faithful_paraphrase

    unique = load_devset(dev_dir).unique_prompts()
    assert len(unique) == 483
    for c in unique:
        assert attribute_differences(c, c) == {}, c
        assert extract_attributes(c)["unknown_terms"] == frozenset(), c
        for k in (0, 1, 2, 3, 4, 7):
            assert attribute_differences(c, faithful_paraphrase(c, k)) == {}, (c, k)
